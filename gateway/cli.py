"""The homemx-gateway command line (placeholder until the gateway lands: it says so and fails)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("homemx-gateway: not implemented yet (see the gateway issue)", file=sys.stderr)
    return 1
