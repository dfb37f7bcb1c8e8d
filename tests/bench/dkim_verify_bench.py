"""Inbound DKIM/ARC verification cost per message (backend/auth): ms p50/p99 for an RSA-2048 and an
Ed25519 signature, ten signatures, and one- and five-hop ARC chains, per message size. Keys answer from memory (the CPU
cost that runs in the worker thread), and once through a real nsd on loopback (with its lookup).

    python -m tests.bench.dkim_verify_bench [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from backend.auth.arc import verify_arc
from backend.auth.dkim import verify_dkim
from tests.bench.dkim_bench import SIZES, make_message
from tests.lab.dkim_inbound import ed25519_key, nsd_lookup, rsa_key
from tests.lab.nsd import NSD, zone_text

DEFAULT_JSON = Path(tempfile.gettempdir()) / "homemx-bench" / "dkim_verify.json"


class MemoryLookup:
    """Key records from a dict: no DNS in the figure."""

    def __init__(self, records: dict[str, str]):
        self.records = records

    async def txt(self, name: str) -> list[str]:
        return [self.records[name]] if name in self.records else []


async def timed(check, runs: int) -> dict:
    await check()  # warm-up
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        await check()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 3), "runs": runs}


async def run(runs: int) -> dict:
    rsa, ed, arc = rsa_key("example.org", "rsa1"), ed25519_key("example.org", "ed1"), rsa_key("list.test", "arc1")
    memory = MemoryLookup({k.record_name: k.txt for k in (rsa, ed, arc)})
    out: dict = {}
    for label, size in SIZES:
        msg = make_message(size)
        for key in (rsa, ed):
            signed = key.sign(msg)
            verdicts = await verify_dkim(signed, memory)
            assert [v.result for v in verdicts] == ["pass"], verdicts
            out[f"dkim {key.algorithm} {label}"] = await timed(lambda: verify_dkim(signed, memory), runs)
        if label == SIZES[-1][0]:
            # Several signatures on one large message: the body is canonicalised once, not per signature.
            many = msg
            for _ in range(10):
                many = ed.sign(many)
            out[f"dkim 10 x ed25519-sha256 {label}"] = await timed(lambda: verify_dkim(many, memory), max(10, runs // 10))
        for hops in (1, 5) if label == SIZES[-1][0] else (1,):
            sealed = msg
            for i in range(hops):
                results = b"arc=pass" if i else b"dkim=pass header.d=example.org"
                sealed = arc.seal(b"Authentication-Results: mx%d.list.test; %s\r\n" % (i, results) + sealed, f"mx{i}.list.test")
            assert (await verify_arc(sealed, memory)).result == "pass"
            out[f"arc rsa-sha256 {hops} hop {label}"] = await timed(lambda: verify_arc(sealed, memory), runs if hops == 1 else max(10, runs // 10))
    zones = {"example.org": zone_text("example.org", rsa.zone_line() + "\n" + ed.zone_line())}
    with NSD(zones) as ns:
        signed = rsa.sign(ed.sign(make_message(2 * 1024)))

        async def fresh_lookup():
            # A new resolver per message: no answer cache, every key fetched from nsd.
            verdicts = await verify_dkim(signed, nsd_lookup(ns))
            assert [v.result for v in verdicts] == ["pass", "pass"], verdicts

        out["dkim rsa-sha256 + ed25519-sha256 2KB, keys from nsd (uncached)"] = await timed(fresh_lookup, runs)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.dkim_verify_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="messages per cell (default 200)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    results = asyncio.run(run(args.runs))
    width = max(map(len, results))
    for name, r in results.items():
        print(f"{name:<{width}}  p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms  ({r['runs']} runs)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
