"""Connection-flood benchmark (B8, issue 17): 10,000 silent connections opened at once at the edge, plus a
steady trickle of real SMTP transactions; p99 of the real ones and the proxy's memory, homemx-gateway
beside HAProxy (mode tcp, send-proxy-v2) with the same connection limit, against the same sink.

Loopback only, bounded: the flood is opened with non-blocking connects and a deadline, held for the
trickle (a fixed number of transactions, each with socket timeouts), then closed. Each proxy is
measured three times in the same run: the trickle alone, during the flood's burst (started with it,
while the proxy works through the queued accepts: the time until it holds them all is reported too),
then with the flood held. The gateway
runs with greet wait off (it dials upstream at once, as HAProxy does); a silent client is one that
connects and never sends a byte. Every proxied session holds two descriptors in the proxy, so with an
open-files hard limit below 2 x 10,000 (not raisable without CAP_SYS_RESOURCE) the flood is the
largest count that fits, and the output says so.

    python -m tests.bench flood [--flood N] [--trickle N] [--rate R] [--json PATH]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.gateway_bench import read_banner, rss_kib  # noqa: E402
from tests.bench.queue_growth_bench import cpu_seconds  # noqa: E402
from tests.gateway.peers import haproxy, stop, wait_port  # noqa: E402
from tests.lab.ports import free_port  # noqa: E402

DEFAULT_JSON = ROOT / "bench-results" / "flood.json"
BODY = b"Subject: trickle\r\n\r\n" + b"x" * 1000 + b"\r\n"


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft open-files limit towards ``wanted`` (up to the hard limit); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_flood(port: int, count: int, deadline_s: float = 30.0) -> list[socket.socket]:
    """``count`` non-blocking connects at once; returns the sockets whose connect completed before the deadline."""
    pending: dict[int, socket.socket] = {}
    done: list[socket.socket] = []
    poller = select.epoll()
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            rc = s.connect_ex(("127.0.0.1", port))
            if rc in (0, errno.EINPROGRESS):
                pending[s.fileno()] = s
                poller.register(s.fileno(), select.EPOLLOUT)
            else:
                s.close()
        end = time.monotonic() + deadline_s
        while pending and time.monotonic() < end:
            for fd, _ in poller.poll(0.5):
                s = pending.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.append(s)
                else:
                    s.close()
        for s in pending.values():
            s.close()
    finally:
        poller.close()
    return done


def transaction(port: int, timeout: float = 10.0) -> float:
    """One whole SMTP transaction (connect, banner, EHLO, MAIL, RCPT, DATA, QUIT); its seconds."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        read_banner(s)
        for cmd in (b"EHLO client.test\r\n", b"MAIL FROM:<a@client.test>\r\n", b"RCPT TO:<b@bench.example>\r\n",
                    b"DATA\r\n", BODY + b".\r\n", b"QUIT\r\n"):
            s.sendall(cmd)
            reply = read_banner(s)
            if reply[:1] not in (b"2", b"3"):
                raise ConnectionError(f"{cmd[:4]!r}: {reply!r}")
    return time.perf_counter() - t0


def trickle(port: int, count: int, rate: float) -> dict:
    """``count`` transactions, one every 1/rate s (sequential, never more than one at a time)."""
    times, failures = [], 0
    nxt = time.perf_counter()
    for _ in range(count):
        nxt += 1 / rate
        try:
            times.append(transaction(port) * 1000)
        except OSError:
            failures += 1
        pause = nxt - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    times.sort()

    def pct(p: float) -> float | None:
        return round(times[min(len(times) - 1, int(p * len(times)))], 2) if times else None

    return {"n": len(times), "failures": failures, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def measure(port: int, pid: int, flood: int, count: int, rate: float, absorb_deadline: float = 60.0) -> dict:
    """The trickle quiet, then during the flood's first seconds (while the proxy works through the burst of
    accepts), then with the flood held; the time until the proxy holds the flood, its memory and CPU."""
    r: dict = {"quiet": trickle(port, count, rate)}
    time.sleep(0.5)
    rss0, fds0, cpu0 = rss_kib(pid), open_fds(pid), cpu_seconds(pid)
    t0 = time.perf_counter()
    socks = open_flood(port, flood)
    try:
        r["open_s"] = round(time.perf_counter() - t0, 2)
        r["connected"] = len(socks)
        burst: dict = {}
        worker = threading.Thread(target=lambda: burst.update(trickle(port, count, rate)), daemon=True)
        worker.start()
        # Until the proxy holds (nearly) every flood connection, or the deadline: its absorb time.
        while (open_fds(pid) - fds0) // 2 < 0.99 * len(socks) and time.perf_counter() - t0 < absorb_deadline:
            time.sleep(0.1)
        r["absorb_s"] = round(time.perf_counter() - t0, 2)
        worker.join(count / rate + 10 * count)  # bounded: every transaction has 10 s socket timeouts
        r["burst"] = burst
        r["held_sessions"] = (open_fds(pid) - fds0) // 2
        r["flood"] = trickle(port, count, rate)
        r["rss_mib_before"] = round(rss0 / 1024, 1)
        r["rss_mib_flood"] = round(rss_kib(pid) / 1024, 1)
        r["kib_per_flood_conn"] = round((rss_kib(pid) - rss0) / max(1, len(socks)), 2)
        r["cpu_s_flood"] = round(cpu_seconds(pid) - cpu0, 2)
    finally:
        for s in socks:
            s.close()
    time.sleep(2.0)  # let the proxy and the sink notice the closes before the next proxy's turn
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench flood", description=__doc__.splitlines()[0])
    ap.add_argument("--flood", type=int, default=10_000, help="silent connections opened at once (default 10000)")
    ap.add_argument("--trickle", type=int, default=200, help="real transactions per phase (default 200)")
    ap.add_argument("--rate", type=float, default=20.0, help="real transactions per second (default 20)")
    ap.add_argument("--gateway-gc-threshold", type=int, default=0,
                    help="experiment: run the gateway with GC thresholds (N, 10, 10) (default: as deployed, gateway.run.GC_THRESHOLDS)")
    ap.add_argument("--skip-haproxy", action="store_true", help="measure the gateway only (experiments)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    if shutil.which("haproxy") is None:
        print("flood_bench: haproxy not installed (./dev setup)", file=sys.stderr)
        return 1
    # Children (sink, gateway, HAProxy) inherit the raised soft limit; a proxy needs two descriptors
    # per session, this process and the sink one each.
    soft = raise_nofile(2 * args.flood + 1000)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    flood = min(args.flood, (soft - 500) // 2)
    results: dict = {"benchmark": "flood", "cpus": os.cpu_count(), "requested": args.flood, "flood": flood,
                     "nofile_soft": soft, "nofile_hard": hard, "trickle": args.trickle, "rate": args.rate}
    if flood < args.flood:
        print(f"flood_bench: RLIMIT_NOFILE hard limit {hard} fits {flood} proxied sessions (2 descriptors "
              f"each), not {args.flood}", file=sys.stderr)
    maxconn = flood + 100  # room for the trickle on top of the flood, the same in both proxies
    work = Path(tempfile.mkdtemp(prefix="hmx-flood-"))
    procs: list[subprocess.Popen] = []
    try:
        proxy_port, plain_port = free_port(), free_port()
        sink = subprocess.Popen([sys.executable, str(ROOT / "tests/bench/gateway_bench.py"), "--sink",
                                 str(proxy_port), str(plain_port)], cwd=ROOT)
        procs.append(sink)
        wait_port("127.0.0.1", proxy_port, proc=sink)
        gw_port = free_port()
        cfg = work / "gateway.toml"
        cfg.write_text(f"""
[server]
hostname = "mx.bench.example"
log_level = "warning"
shutdown_grace = "1s"
[limits]
max_connections = {maxconn}
max_per_client = {maxconn}
rate = 1000000
burst = 1000000
[[listener]]
name = "mx"
kind = "smtp"
listen = "127.0.0.1:{gw_port}"
upstream = "127.0.0.1:{proxy_port}"
proxy_v2 = true
greet_wait = 0
""")
        cmd = [sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)]
        if args.gateway_gc_threshold:  # an experiment, not the deployed gateway: CPython's gen-0 GC threshold
            cmd = [sys.executable, "-c", f"import sys, gateway.run; gateway.run.GC_THRESHOLDS = "
                   f"({args.gateway_gc_threshold}, 10, 10); from gateway.cli import main; sys.exit(main(sys.argv[1:]))",
                   "run", "-c", str(cfg)]
        gw = subprocess.Popen(cmd, cwd=ROOT, stderr=open(work / "gateway.log", "wb"))
        procs.append(gw)
        wait_port("127.0.0.1", gw_port, proc=gw)
        results["homemx-gateway"] = measure(gw_port, gw.pid, flood, args.trickle, args.rate)
        stop(gw)
        if not args.skip_haproxy:
            with haproxy(work, ("127.0.0.1", proxy_port), accept_proxy=False, send_proxy=True,
                         maxconn=maxconn) as hap:
                results["haproxy"] = measure(hap.port, hap.pid, flood, args.trickle, args.rate)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nB8 connection flood ({os.cpu_count()} CPUs; {flood} silent connections at once, maxconn {maxconn}; "
          f"{args.trickle} real transactions at {args.rate:g}/s, quiet then during the flood)")
    print(f"{'':16} {'connected':>9} {'held':>6} {'absorb s':>8} {'p99 quiet':>10} {'p99 burst':>10} "
          f"{'p99 held':>9} {'fail':>5} {'RSS MiB':>8} {'KiB/conn':>9} {'CPU s':>6}")
    for name in ("homemx-gateway", "haproxy"):
        if name not in results:
            continue
        r = results[name]
        fails = r["burst"].get("failures", 0) + r["flood"]["failures"]
        print(f"{name:16} {r['connected']:>9} {r['held_sessions']:>6} {r['absorb_s']:>8} {r['quiet']['p99_ms']:>10} "
              f"{r['burst'].get('p99_ms')!s:>10} {r['flood']['p99_ms']!s:>9} {fails:>5} {r['rss_mib_flood']:>8} "
              f"{r['kib_per_flood_conn']:>9} {r['cpu_s_flood']:>6}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
