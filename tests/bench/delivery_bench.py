"""Outbound delivery benchmark: messages/s from the durable queue to a local sink (Postfix smtp-sink and an aiosmtpd
server with STARTTLS), through the real runner, deliverer, nsd-served MX lookup and fsynced queue updates.

    python -m tests.bench delivery [--messages N] [--recipients R]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.lab.delivery import Harness, LabCA, Receivers, Sink, backend_config
from tests.lab.ports import free_port
from tests.lab.nsd import NSD, zone_text

SMTP_SINK = "/usr/sbin/smtp-sink"


def _message(i: int) -> bytes:
    body = b"The quick brown fox jumps over the lazy dog.\r\n" * 40  # ~2 KB
    return (
        f"From: <alice@example.org>\r\nTo: <bob@sink.test>\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}@example.org>\r\n\r\n"
    ).encode() + body


async def _run(tmp: Path, ns: NSD, port: int, n: int, rcpts: int, label: str, ca_file=None, **delivery) -> None:
    d = {
        "nameservers": [ns.address],
        "dns_port": ns.port,
        "remote_port": port,
        "source_address": "127.0.0.2",
        "mta_sts": False,
        **delivery,
    }
    work = Path(tempfile.mkdtemp(dir=tmp))
    h = Harness(work, backend_config(work, delivery=d), ca_file=ca_file)
    try:
        for i in range(n):
            h.submit("alice@example.org", [f"u{i}-{j}@sink.test" for j in range(rcpts)], _message(i))
        start = time.perf_counter()
        while True:
            await h.round()
            counts, _ = await asyncio.to_thread(h.queue.stats)
            if counts["queued"] == 0 and counts["deferred"] == 0:
                break
            if counts["deferred"]:
                print(f"  {label}: {counts['deferred']} deferred — aborting", file=sys.stderr)
                break
        elapsed = time.perf_counter() - start
        counts, _ = h.queue.stats()
        print(
            f"  {label:<44} {n} msgs x {rcpts} rcpt: {elapsed:6.2f} s  "
            f"{n / elapsed:7.1f} msgs/s  {n * rcpts / elapsed:7.1f} rcpts/s  delivered={counts['delivered']}"
        )
    finally:
        await h.close()


async def _main(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="homemx-bench-delivery-"))
    try:
        zone = zone_text("sink.test", "@ IN MX 10 mx\nmx IN A 127.0.0.41\n")
        with NSD({"sink.test": zone}) as ns:
            port = free_port("127.0.0.41")
            if shutil.which(SMTP_SINK):
                sink = subprocess.Popen(
                    [SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.41:{port}", "256"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                try:
                    await asyncio.sleep(0.3)
                    for conc in (1, 4, 16):
                        await _run(tmp, ns, port, args.messages, args.recipients,
                                   f"smtp-sink, cleartext, per-dest conc {conc}",
                                   per_destination_concurrency=conc)
                finally:
                    sink.terminate()
                    sink.wait(5)
            else:
                print(f"  ({SMTP_SINK} not installed: skipping the Postfix sink)")
            ca = LabCA(tmp)
            receivers = Receivers()
            receivers.port = port
            await receivers.start("127.0.0.41", Sink(), hostname="mx.sink.test", tls_context=ca.server_context("mx.sink.test"))
            try:
                await _run(tmp, ns, port, args.messages, args.recipients,
                           "aiosmtpd (same process), verified STARTTLS", ca_file=ca.ca_file,
                           tls_policy="required", per_destination_concurrency=4)
            finally:
                await receivers.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench delivery")
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--recipients", type=int, default=1)
    args = p.parse_args(argv)
    print(f"delivery: queue (SQLite, fsync per update) → runner → MX lookup (nsd) → SMTP, 2 KB messages")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
