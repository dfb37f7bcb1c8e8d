"""The ``homemx-backend cert`` commands: the ACME certificate's status, and a renewal now.

``cert renew --now`` does not issue by itself: the challenges are answered by the running daemon
(its port 80 and 443 listeners, its in-memory Challenges), so the command asks the daemon through
its renewal socket (acme_dir/renew.wake) and waits for the attempt's outcome in state.json. The
daemon installs the new certificate and reloads TLS itself, as after a scheduled renewal.
"""

from __future__ import annotations

import json
import sys
import time

from backend.cli.run import DEFAULT_CONFIG, load_or_exit
from backend.tls import certfiles, renew
from backend.tls.acme import wanted_names

RENEW_WAIT = 300.0  # an order with Let's Encrypt takes seconds; DNS propagation can take minutes


def register(subparsers) -> None:
    p = subparsers.add_parser("cert", help="the ACME certificate: status, renew now")
    sub = p.add_subparsers(dest="cert_command", metavar="SUBCOMMAND")
    sub.required = True
    s = sub.add_parser("status", help="names, issuer, serial, expiry, next renewal and the last attempt's result",
                       description="Show the live certificate and the renewal state. Exit 1 when there is no "
                       "certificate, only the self-signed placeholder, or the last attempt failed.")
    s.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
    r = sub.add_parser("renew", help="ask the running backend to renew now",
                       description="Ask the running backend to obtain a new certificate now and wait for the "
                       "outcome (the daemon answers the challenges; this command only asks).")
    r.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    r.add_argument("--now", action="store_true", required=True, help="renew now, whatever the schedule")
    r.add_argument("--wait", type=float, default=RENEW_WAIT, help=f"seconds to wait for the outcome (default {RENEW_WAIT:.0f})")
    r.set_defaults(func=cmd_renew)


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def status(cfg) -> dict:
    """The status as a dict (the --json output)."""
    info = certfiles.read_live(cfg.acme_dir)
    state = renew.load_state(cfg.acme_dir)
    wanted = wanted_names(cfg)
    now = time.time()
    cert = None
    if info is not None:
        cert = {
            "names": list(info.names),
            "issuer": info.issuer,
            "serial": format(info.serial, "x"),
            "not_before": _iso(info.not_before),
            "not_after": _iso(info.not_after),
            "days_left": round(info.days_left(now), 1),
            "placeholder": info.placeholder,
            "path": str(certfiles.live_paths(cfg.acme_dir)[0]),
        }
    due = renew.next_due(state, info, wanted, now) if cfg.acme.enabled else None
    return {
        "acme_enabled": cfg.acme.enabled,
        "directory": cfg.acme.directory,
        "challenge": cfg.acme.challenge,
        "wanted_names": wanted,
        "missing_names": [n for n in wanted if info is None or n not in info.names],
        "certificate": cert,
        "renewal": {
            "next_attempt": _iso(max(due, now)) if due is not None else None,
            "last_attempt": _iso(state.last_attempt),
            "last_result": state.last_result,
            "last_error": state.last_error,
            "last_success": _iso(state.last_success),
            "failures": state.failures,
        },
    }


def _healthy(st: dict) -> bool:
    c = st["certificate"]
    return c is not None and not c["placeholder"] and st["renewal"]["last_result"] != "failure"


def cmd_status(args) -> int:
    cfg = load_or_exit(args.config)
    st = status(cfg)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if _healthy(st) else 1
    c, r = st["certificate"], st["renewal"]
    if not st["acme_enabled"]:
        print("ACME: off ([acme] enabled = false); the certificate is [tls] cert")
    if c is None:
        print(f"certificate:  none in {cfg.acme_dir}")
    else:
        print(f"names:        {', '.join(c['names'])}" + ("  (self-signed placeholder)" if c["placeholder"] else ""))
        print(f"issuer:       {c['issuer']}")
        print(f"serial:       {c['serial']}")
        print(f"not after:    {c['not_after']} ({c['days_left']:.1f} days left)")
    if st["missing_names"]:
        print(f"missing:      {', '.join(st['missing_names'])} (wanted; the next attempt asks for them)")
    if st["acme_enabled"]:
        print(f"next renewal: {r['next_attempt']}")
    if r["last_result"] is None:
        print("last result:  no attempt yet")
    elif r["last_result"] == "success":
        print(f"last result:  success at {r['last_success']}")
    else:
        print(f"last result:  failure at {r['last_attempt']} ({r['failures']} in a row): {r['last_error']}")
    return 0 if _healthy(st) else 1


def cmd_renew(args) -> int:
    cfg = load_or_exit(args.config)
    if not cfg.acme.enabled:
        print("cert renew: ACME is off ([acme] enabled = false)", file=sys.stderr)
        return 2
    before = renew.load_state(cfg.acme_dir).last_attempt_end
    if not renew.request_renewal(cfg):
        print(f"cert renew: no running backend listens on {renew.wake_path(cfg)}; start it (it renews by itself "
              "when due)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        state = renew.load_state(cfg.acme_dir)
        if state.last_attempt_end is not None and state.last_attempt_end != before:
            if state.last_result == "success":
                info = certfiles.read_live(cfg.acme_dir)
                print(f"renewed: serial {info.serial:x}, not after {_iso(info.not_after)}, names {', '.join(info.names)}")
                return 0
            print(f"cert renew: failed: {state.last_error} (next attempt {_iso(state.next_attempt)})", file=sys.stderr)
            return 1
        time.sleep(0.2)  # the daemon writes state.json when the attempt ends; nothing to wait on across processes
    print(f"cert renew: asked; no outcome within {args.wait:.0f} s (see `cert status`)", file=sys.stderr)
    return 1
