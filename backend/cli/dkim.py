"""The ``homemx-backend dkim`` commands: generate signing keys and print the TXT records to publish."""

from __future__ import annotations

import argparse
import sys

from backend.dkim import keys as dkim_keys
from backend.config import parse_domain

_SELECTOR_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-")


def _selector(value: str) -> str:
    # RFC 6376 3.1: a selector is one or more DNS labels; we keep to one LDH label, lower-case.
    v = value.lower()
    if not v or len(v) > 63 or not set(v) <= _SELECTOR_OK or v.startswith("-") or v.endswith("-"):
        raise argparse.ArgumentTypeError(f"bad selector {value!r}: use letters, digits and '-' (one DNS label)")
    return v


def _domain(value: str) -> str:
    try:
        return parse_domain(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers) -> None:
    p = subparsers.add_parser("dkim", help="DKIM keys")
    sub = p.add_subparsers(dest="dkim_command", metavar="SUBCOMMAND")
    sub.required = True
    k = sub.add_parser(
        "keygen",
        help="generate DKIM private keys (0600) and print the DNS TXT records to publish",
        description="Generate DKIM private keys (written 0600, never overwritten) and print the zone-file "
        "TXT lines to publish and the [[dkim]] tables to add to backend.toml.",
    )
    k.add_argument("--domain", required=True, type=_domain, help="signing domain (d=)")
    k.add_argument(
        "--selector",
        type=_selector,
        help="selector (s=); with --algorithm both, SELECTOR-rsa and SELECTOR-ed25519; when taken in --dir, "
        "the next free one (SELECTOR-2, SELECTOR-3, ...). "
        "Default: dated, e.g. rsa2025a / ed2025a, then rsa2025b / ed2025b at the next rotation",
    )
    k.add_argument("--algorithm", choices=("rsa", "ed25519", "both"), default="both", help="default: both")
    k.add_argument("--dir", default=".", help="directory for the key files (default: current directory)")
    k.set_defaults(func=cmd_keygen)


def cmd_keygen(args) -> int:
    algorithms = ["rsa", "ed25519"] if args.algorithm == "both" else [args.algorithm]
    generated = []
    try:
        if args.selector is None:
            # Rotation is a new key under a new selector (docs/dkim.md): the next free dated one.
            selectors = dkim_keys.free_default_selectors(args.domain, algorithms, args.dir)
        else:
            # An existing selector is never overwritten nor reused: the next free one (S-2, S-3, ...).
            selectors = dkim_keys.free_named_selectors(args.domain, args.selector, algorithms, args.dir)
        for alg in algorithms:
            generated.append(dkim_keys.generate_key(args.domain, selectors[alg], alg, args.dir))
    except (FileExistsError, OSError) as e:
        print(f"homemx-backend dkim keygen: {e}", file=sys.stderr)
        return 1
    print("; DNS: publish these TXT records (zone-file lines)")
    for g in generated:
        print(g.zone_line())
    print()
    print("# backend.toml: add these tables")
    for g in generated:
        print("[[dkim]]")
        print(f'domain = "{g.domain}"')
        print(f'selector = "{g.selector}"')
        print(f'algorithm = "{g.algorithm}"')
        print(f'private_key = "{g.path.resolve()}"')
        print()
    for g in generated:
        print(f"wrote {g.path} (mode 0600)", file=sys.stderr)
    asked = args.selector and (args.selector if len(algorithms) == 1 else f"{args.selector}-{algorithms[0]}")
    taken = f" ({args.selector!r} was taken in {args.dir})" if asked and generated[0].selector != asked else ""
    print(f"created selector{'s' if len(generated) > 1 else ''} {', '.join(g.selector for g in generated)} "
          f"for {args.domain}{taken}", file=sys.stderr)
    return 0
