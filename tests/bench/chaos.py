"""Chaos run (issue 11, acceptance): ≥ 10,000 messages through homemx-gateway → homemx-backend → a recording sink while clients vanish at random SMTP steps and the backend is SIGKILLed ≥ 10 times (half of them right after the sink refused a recipient, i.e. while bounces are being recorded) and restarted; at the end every acknowledged recipient must be delivered or reported in a DSN: 0 lost, duplicates counted.

All on loopback. Clients (asyncio, tests/chaos/vanish.py) connect to the gateway: 90 % to its relay
listener (→ the backend's lan listener, PROXY v2), sender alice@example.org, recipients at sink.test,
whose MX (lab nsd on loopback) is the sink (tests/chaos/sink.py); 10 % to its MX listener
(→ the backend's mx listener) for bob@example.org's Maildir. The sink refuses ``reject*`` recipients
with 550 (the backend bounces them; the DSNs land in alice's Maildir) and defers ``flaky*`` ones at
random with 451. A message counts as acknowledged only when its client read the 250 after the dot;
every acknowledged (Message-ID, recipient) pair must then show up at the sink, in bob's Maildir, or
in a DSN in alice's Maildir. Messages whose client vanished after the dot may show up too (counted
apart). The run stops by itself: after --messages acknowledged messages (or --max-minutes), then a
bounded wait for the queue to empty.

    python -m tests.bench chaos [--messages N] [--kills K] [--quick] [--seed S] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email
import email.policy
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend.config import load_config  # noqa: E402
from tests.backend.helpers import ALICE, BOB, maildir_files  # noqa: E402
from tests.lab.ports import free_port  # noqa: E402
from tests.chaos.stack import Daemon, backend_daemon, gateway_daemon, tracebacks  # noqa: E402
from tests.chaos.vanish import ACKNOWLEDGED, CLOSE_MODES, MAYBE_COMMITTED, random_step, session  # noqa: E402
from tests.gateway.peers import stop, wait_port  # noqa: E402

DEFAULT_JSON = ROOT / "bench-results" / "chaos.json"
MX_SENDER = "carol@remote.test"
LARGE = 300 * 1024
MSGID_RE = re.compile(rb"^Message-ID:\s*<([^>@]*)@chaos\.test>", re.IGNORECASE | re.MULTILINE)


def recipients(n: int, rng: random.Random) -> list[str]:
    """A mix of deliverable, refused (550 → DSN), deferred-then-delivered (451) recipients, and now
    and then one message whose 40 recipients are all refused (one big bounce to record)."""
    r = rng.random()
    if r < 0.01:
        return [f"reject{n}-{i}@sink.test" for i in range(40)] + [f"user{n}@sink.test"]
    if r < 0.06:
        return [f"reject{n}@sink.test"]
    if r < 0.14:
        return [f"user{n}@sink.test", f"reject{n}@sink.test"]
    if r < 0.22:
        return [f"flaky{n}@sink.test"]
    if r < 0.25:
        return [f"user{n}@sink.test", f"user{n}b@sink.test", f"flaky{n}@sink.test"]
    return [f"user{n}@sink.test"]


@dataclass
class Load:
    target: int
    max_attempts: int
    deadline: float
    rng: random.Random
    vanish_rate: float
    next_n: int = 0
    acked: dict[str, list[str]] = field(default_factory=dict)  # tag → recipients
    maybe: set[str] = field(default_factory=set)  # vanished after the dot: may be delivered
    steps: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)

    def over(self) -> bool:
        return len(self.acked) >= self.target or self.next_n >= self.max_attempts or time.monotonic() > self.deadline


async def client(load: Load, ports: dict[str, int]) -> None:
    rng = load.rng
    while not load.over():
        load.next_n += 1
        n = load.next_n
        tag = f"c{n}"
        if rng.random() < 0.1:
            port, sender, rcpts = ports["mx"], MX_SENDER, [BOB]
        else:
            port, sender, rcpts = ports["relay"], ALICE, recipients(n, rng)
        step = random_step(rng, proxy=False) if rng.random() < load.vanish_rate else "after_221"
        mode = rng.choice(CLOSE_MODES)
        size = LARGE if rng.random() < 0.01 else rng.randint(600, 6000)
        out = await session(port, step, mode, tag, sender=sender, rcpts=rcpts, size=size, timeout=30)
        load.steps[step if step != "after_221" else "complete"] += 1
        if out.acknowledged:
            load.acked[tag] = rcpts
        elif step in MAYBE_COMMITTED or (step in ACKNOWLEDGED and not out.reply_after_dot):
            load.maybe.add(tag)  # sent the dot, never read the reply (a kill between commit and 250 too)
        if out.error:
            # During a restart the gateway answers 421: do not spin through the attempt budget.
            load.errors[_error_kind(out)] += 1
            await asyncio.sleep(rng.uniform(0.05, 0.3))


def _error_kind(out) -> str:
    last = out.replies[-1] if out.replies else ""
    return f"{out.step}: {last[:3] or out.error.split(':')[0]}"


class Killer:
    """SIGKILLs the backend at spread-out moments and restarts it. Even-numbered kills are armed in
    the sink (fired 0–150 ms after its next 550: the backend is recording a bounce); odd ones come
    at a random moment."""

    def __init__(self, backend: Daemon, control_port: int, kills: int, rng: random.Random):
        self.backend, self.control_port, self.kills, self.rng = backend, control_port, kills, rng
        self.log: list[dict] = []

    async def run(self, load: Load, t0: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.control_port)
        span = load.target / (self.kills + 1)
        for i in range(self.kills):
            threshold = int(span * (i + 1) + self.rng.uniform(-span / 3, span / 3))
            while len(load.acked) < threshold and not load.over():
                await asyncio.sleep(0.05)
            if load.over():
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))  # the rest land while the queue drains
            how = await (self._armed(reader, writer) if i % 2 == 0 else self._random())
            self.backend.kill()  # reaps it (and kills it, when the sink did not)
            entry = {"kill": i + 1, "how": how, "at_s": round(time.monotonic() - t0, 2), "acked": len(load.acked)}
            started = time.monotonic()
            await asyncio.to_thread(self.backend.start)
            entry["restart_s"] = round(time.monotonic() - started, 2)
            self.log.append(entry)
            print(f"  kill {entry}", file=sys.stderr, flush=True)
        writer.close()

    async def _armed(self, reader, writer) -> str:
        writer.write(f"ARM {self.backend.proc.pid}\n".encode())
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), 15)
        except asyncio.TimeoutError:
            writer.write(b"DISARM\n")
            await writer.drain()
            line = await reader.readline()  # FIRED (a race) or DISARMED
        words = line.decode().split()
        if words and words[0] == "FIRED":
            return f"after sink {words[1]}"
        self.backend.kill()
        return "random (no refusal within 15 s)"

    async def _random(self) -> str:
        await asyncio.sleep(self.rng.uniform(0, 0.5))
        return "random"


def queue_active(db: Path) -> int:
    """Recipients still queued or deferred (a read-only look, the daemon keeps writing)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute("SELECT COUNT(*) FROM recipient WHERE state IN ('queued','deferred')").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


def maildir_tags(work: Path, address: str) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for f in maildir_files(work, address):
        m = MSGID_RE.search(f.read_bytes())
        out[(m.group(1).decode() if m else "?", address)] += 1
    return out


def dsn_reports(work: Path) -> tuple[collections.Counter, int]:
    """(tag, recipient) pairs reported as failed in the DSNs in alice's Maildir, and the DSN count."""
    out: collections.Counter = collections.Counter()
    files = maildir_files(work, ALICE)
    for f in files:
        msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.compat32)
        tag, failed = None, []
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype == "text/rfc822-headers":
                m = MSGID_RE.search(part.get_payload(decode=True) or b"")
                tag = m.group(1).decode() if m else tag
            elif ctype == "message/delivery-status":
                # RFC 3464 2.1: the per-message block, then one block per recipient.
                for block in part.get_payload()[1:]:
                    if str(block.get("Action", "")).strip().lower() == "failed":
                        failed.append(str(block.get("Final-Recipient", "")).split(";")[-1].strip().lower())
        for rcpt in failed:
            out[(tag or "?", rcpt)] += 1
    return out, len(files)


def sink_records(path: Path) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            mid, _, rcpt = line.partition("\t")
            out[(mid.partition("@")[0], rcpt)] += 1
    return out


def account(load: Load, sink: collections.Counter, mailbox: collections.Counter, dsns: collections.Counter) -> dict:
    lost, bounced_instead, dup_delivered, dup_reported, both = [], [], 0, 0, 0
    pairs = delivered_pairs = reported_pairs = 0
    for tag, rcpts in load.acked.items():
        for r in rcpts:
            pairs += 1
            d = sink[(tag, r)] + mailbox[(tag, r)]
            b = dsns[(tag, r)]
            delivered_pairs += d > 0
            reported_pairs += b > 0 and d == 0
            dup_delivered += max(0, d - 1)
            dup_reported += max(0, b - 1)
            both += d > 0 and b > 0
            if d == 0 and b == 0:
                lost.append(f"{tag} {r}")
            elif d == 0 and not r.startswith("reject"):
                bounced_instead.append(f"{tag} {r}")
    seen_tags = {t for t, _ in sink} | {t for t, _ in mailbox} | {t for t, _ in dsns}
    unacked = seen_tags - set(load.acked)
    return {
        "messages_acknowledged": len(load.acked),
        "recipients_acknowledged": pairs,
        "recipients_delivered": delivered_pairs,
        "recipients_reported_in_dsn": reported_pairs,
        "lost": len(lost),
        "lost_examples": lost[:20],
        "duplicate_deliveries": dup_delivered,
        "duplicate_dsn_reports": dup_reported,
        "delivered_and_reported": both,
        "bounced_though_deliverable": len(bounced_instead),
        "bounced_though_deliverable_examples": bounced_instead[:20],
        "unacknowledged_messages_delivered": len(unacked & load.maybe),
        "unknown_messages_delivered": sorted(unacked - load.maybe)[:20],
    }


async def drive(load: Load, gw_ports: dict[str, int], killer: Killer, workers: int) -> None:
    t0 = time.monotonic()
    kill_task = asyncio.create_task(killer.run(load, t0))
    progress = asyncio.create_task(_progress(load, t0))
    await asyncio.gather(*(client(load, gw_ports) for _ in range(workers)))
    await kill_task
    progress.cancel()


async def _progress(load: Load, t0: float) -> None:
    while True:
        await asyncio.sleep(10)
        print(f"  {time.monotonic() - t0:6.0f}s: {load.next_n} sessions, {len(load.acked)} acknowledged",
              file=sys.stderr, flush=True)


def run(args) -> dict:
    from tests.lab.nsd import NSD, zone_text

    rng = random.Random(args.seed)
    results: dict = {"benchmark": "chaos", "seed": args.seed, "target_messages": args.messages, "kills": args.kills,
                     "vanish_rate": args.vanish_rate, "workers": args.workers, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="hmx-chaos-") as d:
        work = Path(d)
        sink_port, control_port = free_port(), free_port()
        record = work / "sink-record.tsv"
        zone = zone_text("sink.test", "@ IN MX 10 mx\nmx IN A 127.0.0.1\n")
        with NSD({"sink.test": zone}) as nsd:
            sink = subprocess.Popen([sys.executable, "-m", "tests.chaos.sink", "--port", str(sink_port),
                                     "--control-port", str(control_port), "--record", str(record),
                                     "--seed", str(args.seed)], cwd=ROOT, stderr=open(work / "sink.log", "wb"))
            extra = (f'[delivery]\nnameservers = ["{nsd.address}"]\ndns_port = {nsd.port}\nremote_port = {sink_port}\n'
                     'mta_sts = false\nretry_schedule = ["1s", "2s", "4s"]\nconcurrency = 40\n'
                     'per_destination_concurrency = 20\n')
            backend, ports = backend_daemon(work, extra=extra)
            gateway, gw_ports = gateway_daemon(work, {"mx": ports.mx, "relay": ports.lan}, greet_wait="100ms")
            try:
                wait_port("127.0.0.1", sink_port, proc=sink)
                wait_port("127.0.0.1", control_port, proc=sink)
                backend.start()
                gateway.start()
                load = Load(args.messages, args.messages * 3 + 1000, time.monotonic() + args.max_minutes * 60, rng,
                            args.vanish_rate)
                killer = Killer(backend, control_port, args.kills, rng)
                t0 = time.monotonic()
                asyncio.run(drive(load, gw_ports, killer, args.workers))
                results["load_seconds"] = round(time.monotonic() - t0, 1)
                db = load_config(backend.config).queue_db
                drain_deadline = time.monotonic() + args.drain_seconds
                quiet = 0
                while time.monotonic() < drain_deadline and quiet < 3:
                    quiet = quiet + 1 if queue_active(db) == 0 else 0
                    time.sleep(1)
                results["still_queued"] = queue_active(db)
                results["total_seconds"] = round(time.monotonic() - t0, 1)
                results["gateway_exit"] = gateway.stop()
                results["backend_exit"] = backend.stop()
            finally:
                gateway.kill()
                backend.kill()
                stop(sink)
            results["sessions"] = load.next_n
            results["sessions_by_step"] = dict(load.steps.most_common())
            results["session_errors"] = dict(load.errors.most_common(20))
            results["kill_log"] = killer.log
            results["kills_done"] = len(killer.log)
            results["kills_after_sink_refusal"] = sum(1 for k in killer.log if k["how"].startswith("after sink"))
            dsns, dsn_count = dsn_reports(work)
            results["dsn_messages"] = dsn_count
            results.update(account(load, sink_records(record), maildir_tags(work, BOB), dsns))
            results["tracebacks"] = {dm.name: len(tracebacks(dm.log())) for dm in (backend, gateway)}
            first = [t for dm in (backend, gateway) for t in tracebacks(dm.log())][:1]
            if first:
                results["first_traceback"] = first[0]
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                for name in ("backend.log", "gateway.log", "sink.log", "sink-record.tsv"):
                    if (work / name).exists():
                        (keep / name).write_bytes((work / name).read_bytes())
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, help="acknowledged messages to reach (default 10000; --quick 1000)")
    ap.add_argument("--kills", type=int, help="SIGKILLs of the backend (default 10; --quick 3)")
    ap.add_argument("--quick", action="store_true", help="a short try (about 30 s): 1000 messages, 3 kills")
    ap.add_argument("--workers", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--vanish-rate", type=float, default=0.15, help="share of sessions that vanish (default 0.15)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--max-minutes", type=float, default=30.0, help="bound on the load phase (default 30)")
    ap.add_argument("--drain-seconds", type=float, default=300.0, help="bound on the final queue drain (default 300)")
    ap.add_argument("--keep", metavar="DIR", help="copy the daemons' logs and the sink record here")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    if args.messages is None:
        args.messages = 1000 if args.quick else 10_000
    if args.kills is None:
        args.kills = 3 if args.quick else 10
    r = run(args)
    print(f"\nchaos run: {r['sessions']} sessions ({r['vanish_rate']:.0%} vanishing at random steps), "
          f"{r['kills_done']} SIGKILLs of the backend ({r['kills_after_sink_refusal']} right after a 550), "
          f"{r['total_seconds']} s")
    print(f"  acknowledged messages     {r['messages_acknowledged']:8d}   recipients {r['recipients_acknowledged']}")
    print(f"  recipients delivered      {r['recipients_delivered']:8d}   (sink + bob's Maildir)")
    print(f"  recipients in DSNs        {r['recipients_reported_in_dsn']:8d}   ({r['dsn_messages']} DSNs)")
    print(f"  lost                      {r['lost']:8d}")
    print(f"  duplicate deliveries      {r['duplicate_deliveries']:8d}   duplicate DSN reports {r['duplicate_dsn_reports']}")
    print(f"  bounced though deliverable {r['bounced_though_deliverable']:7d}")
    print(f"  unacknowledged delivered  {r['unacknowledged_messages_delivered']:8d}   (client vanished after the dot)")
    print(f"  still queued at the end   {r['still_queued']:8d}   exit codes: backend {r['backend_exit']}, "
          f"gateway {r['gateway_exit']}; tracebacks {r['tracebacks']}")
    ok = (r["lost"] == 0 and r["recipients_delivered"] + r["recipients_reported_in_dsn"] == r["recipients_acknowledged"]
          and r["kills_done"] >= args.kills and not r["unknown_messages_delivered"] and r["backend_exit"] == 0
          and not any(r["tracebacks"].values()))
    r["ok"] = ok
    print("  OK: acknowledged = delivered + reported, 0 lost" if ok else "  FAILED (see the JSON)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
