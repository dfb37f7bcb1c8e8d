"""Fairness benchmark (B6): p50/p99 time to 250 of small messages sent one after another (1 session, new connection each) through homemx-gateway → homemx-backend on loopback, idle and while 25 MB messages are in flight through the same two daemons.

The gateway relays to the backend's mx listener with a PROXY v2 header (as in production, minus the
tunnel); the small messages and the large ones go to a local user, so the backend writes both into
its queue and Maildir. The large messages come from Postfix's smtp-source in its own process, one
after another, for the whole loaded phase, so a 25 MB DATA is always being read, committed or
delivered. A stall of either event loop shows as a long tail in the loaded p99.

    python -m tests.bench fairness [--small N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.backend.helpers import listener_block  # noqa: E402
from tests.bench.accept_bench import SMTP_SOURCE, Backend  # noqa: E402
from tests.gateway.peers import stop, wait_port  # noqa: E402
from tests.lab.ports import free_port  # noqa: E402

DEFAULT_JSON = ROOT / "bench-results" / "fairness.json"
LARGE = 25 * 1024 * 1024
SMALL_BODY = b"Subject: small\r\nFrom: <friend@remote.test>\r\n\r\n" + b"The quick brown fox jumps over the lazy dog.\r\n" * 22


def start_gateway(work: Path, upstream_port: int, upstream_host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    """homemx-gateway on a loopback port relaying with PROXY v2 to upstream (greet wait off, no rate limit)."""
    port = free_port()
    cfg = work / "gateway.toml"
    cfg.write_text(f"""[server]
hostname = "mx.bench.example"
log_level = "warning"
shutdown_grace = "1s"
[limits]
max_connections = 2000
max_per_client = 2000
rate = 1000000
burst = 1000000
[[listener]]
name = "mx"
kind = "smtp"
listen = "127.0.0.1:{port}"
upstream = "{upstream_host}:{upstream_port}"
proxy_v2 = true
greet_wait = 0
""")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(work / "gateway.log", "wb"))
    wait_port("127.0.0.1", port, proc=proc, timeout=20)
    return proc, port


def backend_mx(work: Path) -> Backend:
    """The backend with one mx listener behind the gateway (PROXY v2 from loopback only)."""
    mx = listener_block("mx", "mx", "127.0.0.1:{port}", proxy_protocol=True, trusted_proxies=["127.0.0.1/32"],
                        max_message_size="50MB")
    return Backend(work, mx)


def small_latencies(port: int, count: int) -> list[float]:
    """Seconds from connect to the 250 after DATA, per message (sequential, one connection each)."""
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("client.bench.example")
            s.sendmail("friend@remote.test", ["alice@example.org"], SMALL_BODY)
            out.append(time.perf_counter() - t0)
            s.quit()
    return out


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def summary(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": round(pct(lat, 50) * 1000, 2), "p99_ms": round(pct(lat, 99) * 1000, 2),
            "max_ms": round(max(lat) * 1000, 2), "mean_ms": round(statistics.mean(lat) * 1000, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench fairness", description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=300, help="small messages per phase (default 300)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    if not Path(SMTP_SOURCE).exists():
        print(f"fairness_bench: {SMTP_SOURCE} missing (./dev setup installs postfix)", file=sys.stderr)
        return 1
    results: dict = {"benchmark": "fairness", "large_bytes": LARGE, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="hmx-fairbench-") as d:
        work = Path(d)
        gw = None
        with backend_mx(work) as be:
            try:
                gw, port = start_gateway(work, be.port)
                small_latencies(port, 10)  # warm-up
                results["idle"] = summary(small_latencies(port, args.small))
                print(f"  idle: {results['idle']}", file=sys.stderr, flush=True)
                # Large messages back to back until the loaded phase ends (bounded: at most 200 of them).
                big = subprocess.Popen([SMTP_SOURCE, "-s", "1", "-m", "200", "-l", str(LARGE), "-f",
                                        "friend@remote.test", "-t", "alice@example.org", f"127.0.0.1:{port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(0.5)  # the first 25 MB DATA is under way
                    t0 = time.perf_counter()
                    lat = small_latencies(port, args.small)
                    results["loaded_seconds"] = round(time.perf_counter() - t0, 2)
                    results["loaded_large_sender_running"] = big.poll() is None
                finally:
                    stop(big)
                results["loaded"] = summary(lat)
                print(f"  loaded: {results['loaded']}", file=sys.stderr, flush=True)
            finally:
                if gw is not None:
                    stop(gw)
        big_files = [p for p in (work / "data").rglob("*") if p.is_file() and p.stat().st_size > LARGE // 2]
        results["large_messages_stored"] = len(big_files)
    results["p99_ratio"] = round(results["loaded"]["p99_ms"] / results["idle"]["p99_ms"], 2)
    print(f"\nB6 fairness: small messages (1 KB, 1 session, new connection each) gateway → backend, "
          f"idle vs while 25 MB messages flow")
    print(f"{'':8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for k in ("idle", "loaded"):
        r = results[k]
        print(f"{k:8} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f}")
    print(f"p99 loaded / idle = {results['p99_ratio']:.2f} (issue 17: floor <= 3.0, aim 2.0); "
          f"{results['large_messages_stored']} large messages stored meanwhile")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
