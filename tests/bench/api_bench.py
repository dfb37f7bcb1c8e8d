"""HTTP send API benchmark (B10; B8 before issue 17 gave B7/B8 to the queue-growth and flood benches): messages/s acknowledged by a real `homemx-backend run` through
``POST /v1/messages`` (202) beside SMTP on its lan listener (250), same message, same pipeline
(trace header, Date/Message-ID, DKIM ed25519 signature, fsynced group-commit queue), at 1 and 10
concurrent clients. Both clients keep their connection (HTTP keep-alive; an SMTP session sends 100
messages before the next one), so the figures compare the front ends, not connection set-up.

Recipients are remote and ``[delivery] paused = true``: nothing is delivered, only accepted.

    python -m tests.bench api [--messages N] [--single N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import aiosmtplib  # noqa: E402

from backend.dkim import keys as dkim_keys  # noqa: E402
from backend.http.apikeys import KeyStore  # noqa: E402
from tests.backend.helpers import listener_block, wait_for_sync  # noqa: E402
from tests.bench.accept_bench import _PROBE, Backend  # noqa: E402
from tests.lab.ports import free_port  # noqa: E402

DEFAULT_JSON = ROOT / "bench-results" / "api.json"
SIZE = 5120  # body bytes, as B3's smtp-source -l
SENDER, RECIPIENT = "app@example.org", "friend@remote.test"
SMTP_PER_SESSION = 100  # messages per SMTP session before a new one
TEXT = ("homemx api bench " * 400)[:SIZE - 1] + "\n"


def smtp_message() -> bytes:
    m = EmailMessage(policy=SMTP)
    m["From"], m["To"], m["Subject"] = SENDER, RECIPIENT, "bench"
    m.set_content(TEXT)
    return m.as_bytes()


async def measure(workers: int, messages: int, open_client, send_one, close_client) -> dict:
    latencies: list[float] = []
    left = [messages]

    async def worker(client) -> None:
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            await send_one(client)
            latencies.append(time.perf_counter() - t0)

    clients = [await open_client() for _ in range(workers)]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        elapsed = time.perf_counter() - t0
    finally:
        for c in clients:
            await close_client(c)
    latencies.sort()
    return {"msgs_per_s": round(messages / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2)}


async def bench(api_port: int, lan_port: int, token: str, single: int, many: int) -> dict:
    body = {"from": SENDER, "to": RECIPIENT, "subject": "bench", "text": TEXT}
    headers = {"Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{api_port}/v1/messages"
    raw = smtp_message()

    async def http_open():
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))  # one kept-alive connection each

    async def http_send(session):
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 202:
                raise RuntimeError(f"API answered {r.status}: {await r.text()}")
            await r.read()

    async def http_close(session):
        await session.close()

    async def smtp_connect() -> aiosmtplib.SMTP:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=lan_port, start_tls=False, local_hostname="bench.test")
        await c.connect()
        return c

    async def smtp_open():
        return {"smtp": await smtp_connect(), "sent": 0}

    async def smtp_send(client):
        if client["sent"] == SMTP_PER_SESSION:
            # The listener caps each command at 200 per session (receive/smtpd.py call_limit), as a
            # client reusing sessions caps them (Postfix: smtp_connection_reuse_count_limit).
            await client["smtp"].quit()
            client["smtp"], client["sent"] = await smtp_connect(), 0
        errors, reply = await client["smtp"].sendmail(SENDER, [RECIPIENT], raw)
        client["sent"] += 1
        if errors or not reply.startswith("2"):
            raise RuntimeError(f"SMTP refused: {errors} {reply}")

    async def smtp_close(client):
        await client["smtp"].quit()

    out = {}
    for name, fns in (("api", (http_open, http_send, http_close)), ("smtp", (smtp_open, smtp_send, smtp_close))):
        await measure(1, 20, *fns)  # warm-up
        out[name] = {"c1": await measure(1, single, *fns), "c10": await measure(10, many, *fns)}
        print(f"  {name}: {out[name]['c1']['msgs_per_s']}/s @1, {out[name]['c10']['msgs_per_s']}/s @10",
              file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench api", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages at 10 clients (default 2000)")
    ap.add_argument("--single", type=int, default=300, help="messages at 1 client (default 300)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="homemx-api-bench-") as tmp:
        work = Path(tmp)
        g = dkim_keys.generate_key("example.org", "s1", "ed25519", work)
        api_port = free_port()
        extra = (f'[api]\nenabled = true\nlisten = "127.0.0.1:{api_port}"\n\n'
                 f'[[dkim]]\ndomain = "example.org"\nselector = "s1"\nalgorithm = "ed25519"\n'
                 f'private_key = "{g.path}"\n\n'
                 '[delivery]\npaused = true\nnameservers = ["127.0.0.1"]\ndns_port = 9\n')
        listeners = listener_block("lan", "lan", "127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"])
        be = Backend(work, listeners=listeners, extra=extra)
        store = KeyStore(work / "data" / "apikeys.sqlite3")
        _, token, _ = store.create("bench", [SENDER], rate_per_minute=10_000_000)
        store.close()
        with be:
            # The lan port answers first; the API listener is bound last in Backend.start.
            wait_for_sync(lambda: subprocess.run([sys.executable, "-c", _PROBE, "127.0.0.1", str(api_port)]).returncode
                          == 0, 30)
            figures = asyncio.run(bench(api_port, be.port, token, args.single, args.messages))
    results = {"benchmark": "api", "message_bytes": SIZE, "cpus": os.cpu_count(), **figures}
    results["ratio_c1"] = round(figures["api"]["c1"]["msgs_per_s"] / figures["smtp"]["c1"]["msgs_per_s"], 3)
    results["ratio_c10"] = round(figures["api"]["c10"]["msgs_per_s"] / figures["smtp"]["c10"]["msgs_per_s"], 3)
    print(f"\nB10 HTTP send API vs SMTP lan ({os.cpu_count()} CPUs, {SIZE} B body, kept-alive connections, "
          "DKIM ed25519, "
          f"{platform.python_implementation()} {platform.python_version()})")
    print(f"{'':16} {'msgs/s @1':>10} {'p50 ms':>8} {'msgs/s @10':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for name, label in (("api", "API (202)"), ("smtp", "SMTP lan (250)")):
        f = figures[name]
        print(f"{label:16} {f['c1']['msgs_per_s']:10.1f} {f['c1']['p50_ms']:8.2f} {f['c10']['msgs_per_s']:11.1f} "
              f"{f['c10']['p50_ms']:8.2f} {f['c10']['p99_ms']:8.2f}")
    print(f"{'API / SMTP':16} {results['ratio_c1']:10.2f} {'':8} {results['ratio_c10']:11.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
