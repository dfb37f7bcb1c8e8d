"""Gateway benchmark: homemx-gateway and HAProxy (mode tcp, send-proxy-v2) side by side against one PROXY-aware SMTP sink, driven by Postfix smtp-source; prints latency, throughput and memory per idle connection.

Loopback only. Both proxies face the identical upstream: a minimal asyncio SMTP sink in its own
process that reads the PROXY v2 header with the backend's decoder (one port) or none (a second
port, the no-proxy baseline). The gateway runs with greet wait off so both proxies do the same
work (accept, dial, header, splice); HAProxy runs with its defaults (one thread per core).

    python -m tests.bench gateway            (or: python -m tests.bench.gateway_bench)
    python -m tests.bench.gateway_bench --idle 2000 --messages 100   (a quicker run)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.gateway.peers import haproxy, stop, wait_for_text, wait_port  # noqa: E402
from tests.lab.ports import free_port  # noqa: E402

# ---------------------------------------------------------------- the shared upstream


async def _sink_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: bool) -> None:
    from tests.lab.proxyv2_decoder import parse_proxy_v2

    try:
        if proxy:
            buf = b""
            while (parsed := parse_proxy_v2(buf)) is None:
                chunk = await reader.read(256)
                if not chunk:
                    return
                buf += chunk
            if buf[parsed[1]:]:
                return  # a client talking before the banner: not in this benchmark
        writer.write(b"220 sink ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                tail = b""
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    if b"\r\n.\r\n" in tail + chunk:
                        break
                    tail = chunk[-4:]
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            elif verb in (b"EHLO", b"HELO"):
                writer.write(b"250 sink\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _sink_main(proxy_port: int, plain_port: int) -> None:
    s1 = await asyncio.start_server(lambda r, w: _sink_session(r, w, True), "127.0.0.1", proxy_port, backlog=4096)
    s2 = await asyncio.start_server(lambda r, w: _sink_session(r, w, False), "127.0.0.1", plain_port, backlog=4096)
    async with s1, s2:
        await asyncio.Event().wait()


# ---------------------------------------------------------------- helpers


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) from /proc/<pid>/stat, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def smtp_source(port: int, sessions: int, messages: int, size: int) -> float:
    """Seconds smtp-source needs for ``messages`` messages of ``size`` bytes, one connection each."""
    t0 = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", "sender@bench.example", "-t", "rcpt@bench.example", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600,
    )
    return time.perf_counter() - t0


def read_banner(sock: socket.socket) -> bytes:
    """Read up to the end of the first line; a connection closed before that raises
    ConnectionError (a bare ``recv`` returning b"" forever would spin at 100% CPU)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(100)
        if not chunk:
            raise ConnectionError(f"connection closed before the banner (got {data!r})")
        data += chunk
    return data


def idle_connections(port: int, pid: int, count: int) -> float:
    """KiB of RSS the proxy process gains per idle relayed SMTP session (banner received)."""
    time.sleep(0.5)
    before = rss_kib(pid)
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.settimeout(30)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        for s in socks:  # every session is fully spliced: the sink's banner came through
            read_banner(s)
        time.sleep(1.0)
        after = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return (after - before) / count


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gateway_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=300, help="messages for the latency test")
    ap.add_argument("--rate-messages", type=int, default=2000, help="messages for the 20-session test")
    ap.add_argument("--bulk-messages", type=int, default=3, help="10 MB messages for the bulk test")
    ap.add_argument("--idle", type=int, default=10_000, help="idle connections for the memory test")
    args = ap.parse_args(argv)
    for tool in ("smtp-source", "haproxy"):
        if shutil.which(tool) is None:
            print(f"gateway_bench: {tool} not installed (./dev setup)", file=sys.stderr)
            return 1
    # Two descriptors per relayed session in each proxy, one per socket here and in the sink.
    want = max(4 * args.idle + 1000, 4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):
        # Without CAP_SYS_RESOURCE (containers) the hard limit stays; a proxy needs two
        # descriptors per session, so measure at the largest count that fits and say so.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        fits = (hard - 100) // 2
        if args.idle > fits:
            print(f"gateway_bench: RLIMIT_NOFILE hard limit {hard} cannot be raised here; "
                  f"measuring {fits} idle connections instead of {args.idle}", file=sys.stderr)
            args.idle = fits

    work = Path(tempfile.mkdtemp(prefix="hmx-gwbench-"))
    procs: list[subprocess.Popen] = []
    try:
        proxy_port, plain_port = free_port(), free_port()
        sink = subprocess.Popen([sys.executable, __file__, "--sink", str(proxy_port), str(plain_port)], cwd=ROOT)
        procs.append(sink)
        wait_port("127.0.0.1", plain_port, proc=sink)
        wait_port("127.0.0.1", proxy_port, proc=sink)

        cfg = work / "gateway.toml"
        cfg.write_text(f"""
[server]
hostname = "mx.bench.example"
log_level = "warning"
shutdown_grace = "1s"
[limits]
max_connections = {args.idle + 1000}
max_per_client = {args.idle + 1000}
rate = 1000000
burst = 1000000
[[listener]]
name = "mx"
kind = "smtp"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{proxy_port}"
proxy_v2 = true
greet_wait = 0
""")
        glog = work / "gateway.log"
        # log_level warning hides the "listener ... on" line, so give the gateway a port up front.
        gw_port = free_port()
        cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{gw_port}"'))
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=ROOT,
                              stderr=open(glog, "wb"))
        procs.append(gw)
        wait_port("127.0.0.1", gw_port, proc=gw)

        with haproxy(work, ("127.0.0.1", proxy_port), accept_proxy=False, send_proxy=True,
                     maxconn=args.idle + 10) as hap:
            targets = {"direct (no proxy)": (plain_port, sink.pid), "homemx-gateway": (gw_port, gw.pid),
                       "haproxy 2.6": (hap.port, hap.pid)}
            results: dict[str, dict[str, float]] = {name: {} for name in targets}
            for name, (port, pid) in targets.items():
                smtp_source(port, 1, 20, 5120)  # warm up
                t = smtp_source(port, 1, args.messages, 5120)
                results[name]["latency_ms"] = t / args.messages * 1000
                cpu0 = cpu_seconds(pid)
                t = smtp_source(port, 20, args.rate_messages, 5120)
                results[name]["msgs_per_s"] = args.rate_messages / t
                # The proxy's own CPU per relayed session (smtp-source opens one connection per message).
                results[name]["cpu_ms_per_session"] = (cpu_seconds(pid) - cpu0) / args.rate_messages * 1000
                t = smtp_source(port, 1, args.bulk_messages, 10 * 1024 * 1024)
                results[name]["bulk_mb_s"] = args.bulk_messages * 10 / t
            for name in ("homemx-gateway", "haproxy 2.6"):
                port, pid = targets[name]
                results[name]["idle_kib"] = idle_connections(port, pid, args.idle)
                time.sleep(2)  # let the sink notice the closes before the next proxy's turn

        base = results["direct (no proxy)"]["latency_ms"]
        print(f"\nhomemx gateway benchmark (loopback, {os.cpu_count()} CPUs; 5 KB messages, new connection each)")
        # The CPU column comes last: tests/bench/report.py reads the first five by position.
        print(f"{'':20} {'ms/transaction':>15} {'added ms':>9} {'msgs/s @20':>11} {'10 MB MB/s':>11} "
              f"{'KiB/idle conn @' + str(args.idle):>22} {'CPU ms/session @20':>19}")
        for name, r in results.items():
            added = f"{r['latency_ms'] - base:9.3f}" if name != "direct (no proxy)" else f"{'-':>9}"
            idle = f"{r['idle_kib']:22.2f}" if "idle_kib" in r else f"{'-':>22}"
            # The sink's CPU for the direct row is not a proxy's: no figure there.
            cpu = f"{r['cpu_ms_per_session']:19.3f}" if name != "direct (no proxy)" else f"{'-':>19}"
            print(f"{name:20} {r['latency_ms']:15.3f} {added} {r['msgs_per_s']:11.0f} {r['bulk_mb_s']:11.1f} {idle} {cpu}")
        gw, hap = results["homemx-gateway"], results["haproxy 2.6"]
        if hap["cpu_ms_per_session"] > 0:
            print(f"gateway CPU per relayed session: {gw['cpu_ms_per_session']:.3f} ms, HAProxy "
                  f"{hap['cpu_ms_per_session']:.3f} ms ({gw['cpu_ms_per_session'] / hap['cpu_ms_per_session']:.1f}x)")
        return 0
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--sink":
        asyncio.run(_sink_main(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit(main())
