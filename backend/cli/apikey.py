"""CLI: ``apikey create|list|revoke``, the keys of the HTTP send API (backend/http/apikeys.py).

The token and the webhook secret are printed once, by ``create``; nothing can show them again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.http.apikeys import MODES, PRODUCTION, APIKeyError, KeyStore


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("apikey", help="manage the keys of the HTTP send API")
    asub = a.add_subparsers(dest="apikey_command", metavar="ACTION")
    asub.required = True
    c = asub.add_parser("create", help="create a key; prints its token (and webhook secret) once")
    c.add_argument("--name", required=True, help="what the key is for (shown by list)")
    c.add_argument("--sender", action="append", required=True, metavar="ADDR|@DOMAIN",
                   help="an address or @domain the key may send as (repeatable)")
    c.add_argument("--rate", type=int, default=60, help="messages per minute (default 60)")
    c.add_argument("--mode", choices=MODES, default=PRODUCTION)
    c.add_argument("--redirect-to", action="append", default=[], metavar="ADDR",
                   help="mode redirect: every message goes here instead (repeatable)")
    c.add_argument("--bcc-to", action="append", default=[], metavar="ADDR",
                   help="mode bcc: an archive copy goes here too (repeatable)")
    c.add_argument("--webhook", metavar="URL", help="delivery events are POSTed here, signed")
    lst = asub.add_parser("list", help="the keys, revoked ones included (never their tokens)")
    lst.add_argument("--json", action="store_true")
    r = asub.add_parser("revoke", help="revoke a key at once")
    r.add_argument("id")
    for p in (c, lst, r):
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        p.set_defaults(func=cmd_apikey)


def cmd_apikey(args) -> int:
    cfg = load_or_exit(args.config)
    try:
        store = KeyStore(cfg.server.data_dir / "apikeys.sqlite3")
    except OSError as e:
        print(f"homemx-backend: {e}", file=sys.stderr)
        return 1
    try:
        if args.apikey_command == "create":
            key, token, secret = store.create(
                args.name, args.sender, rate_per_minute=args.rate, mode=args.mode, redirect_to=args.redirect_to,
                bcc_to=args.bcc_to, webhook_url=args.webhook,
            )
            print(f"id: {key.id}")
            print(f"token: {token}")
            if secret:
                print(f"webhook secret: {secret}")
            print("The token" + (" and the webhook secret are" if secret else " is")
                  + " shown only now: store them where the application reads its secrets.", file=sys.stderr)
            return 0
        if args.apikey_command == "list":
            keys = store.list()
            if args.json:
                print(json.dumps([k.to_json() for k in keys], indent=2))
                return 0
            for k in keys:
                state = "revoked " + time.strftime("%Y-%m-%d", time.gmtime(k.revoked)) if k.revoked else "active"
                extra = {"redirect": k.redirect_to, "bcc": k.bcc_to}.get(k.mode, ())
                mode = k.mode + (" -> " + ",".join(extra) if extra else "")
                print(f"{k.id}  {k.name}  senders={','.join(k.senders)}  rate={k.rate_per_minute}/min  mode={mode}"
                      f"  webhook={k.webhook_url or '-'}  {state}")
            return 0
        if not store.revoke(args.id):
            print(f"homemx-backend: no key {args.id} in service", file=sys.stderr)
            return 1
        print(f"apikey revoked: {args.id}")
        return 0
    except APIKeyError as e:
        print(f"homemx-backend: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
