"""Benchmark dispatcher: `python -m tests.bench [NAME [ARGS...]]` runs one benchmark, or (no NAME) the report over all of them.

Add a benchmark by adding NAME → module to BENCHMARKS; the module exposes main(argv: list[str]) -> int.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "dkim": "tests.bench.dkim_bench",  # DKIM signs/s per algorithm and size, beside openssl speed
    "gateway": "tests.bench.gateway_bench",  # homemx-gateway vs HAProxy send-proxy-v2: latency, msgs/s, bulk, KiB/idle conn
    "delivery": "tests.bench.delivery_bench",  # outbound msgs/s from the queue to smtp-sink / aiosmtpd with STARTTLS
    "accept": "tests.bench.accept_bench",  # B3: durable accept msgs/s, homemx-backend vs Postfix, beside the disk's fsync rate
    "fairness": "tests.bench.fairness_bench",  # B6: small-message latency while 25 MB messages flow gateway → backend
    "e2e": "tests.bench.e2e_bench",
    "api": "tests.bench.api_bench",  # B10: msgs/s through the HTTP send API (202) beside SMTP on the lan listener (250)
    "inbound": "tests.bench.inbound_bench",  # B9: ms added per message and mx msgs/s by SPF/DKIM/ARC/DMARC, then rspamd (issue 13)
    "dkim_verify": "tests.bench.dkim_verify_bench",  # inbound DKIM/ARC verification cost alone, per size, keys from memory and nsd
    "chaos": "tests.bench.chaos",  # issue 11: 10k messages, vanishing clients, SIGKILLed backend; 0 lost, duplicates counted
    "fuzz": "tests.bench.fuzz",  # issue 11: SMTP commands and PROXY v2 headers fuzzed for N minutes; no thread died, no traceback
    "queue_growth": "tests.bench.queue_growth_bench",  # B7: accept rate, first delivery, idle CPU, RSS, queue list/show with 0..1M deferred
    "flood": "tests.bench.flood_bench",  # B8: 10k silent connections at the edge + a trickle of real SMTP, gateway vs HAProxy
    "report": "tests.bench.report",  # B1–B10 in one run: one table of figures, ratios vs peers and targets, JSON  # B5: smtp-source → gateway → backend (queue + DKIM) → smtp-sink vs HAProxy → Postfix
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("benchmarks: " + ", ".join(BENCHMARKS))
        return 0
    if argv:
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        return importlib.import_module(BENCHMARKS[name]).main(rest)
    # No name: the whole set, through the report (one table, bench-results/results.json).
    return importlib.import_module(BENCHMARKS["report"]).main([])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
