"""Queue-growth benchmark (B7, issue 17): what a real `homemx-backend run` costs with 0, 10k, 100k and 1M
messages already deferred in its queue — accept rate, time from 250 to the first delivery of a new
message, CPU while idle and per runner round, resident memory, `queue list` and `queue show` times,
and the query plans of the runner's and the CLI's queries.

The backlog is seeded in one transaction through the store's own ``Queue.transact`` (one message
row with a 1-byte body and one remote recipient each, ``deferred`` with its next attempt spread
over the next four days, so nothing of it comes due during the run). Remote delivery is paused by
default (``--delivery on``: on, its DNS at a closed loopback port, so remote mail is deferred at once
and nothing leaves the machine): the runner then makes local-only rounds, whose queries must skip
the remote backlog. The new message goes to a local mailbox: its first delivery attempt is the
Maildir file appearing. The accept rate is measured with remote recipients (queued, not attempted).

    python -m tests.bench queue_growth [--sizes 0,10000,100000,1000000] [--messages N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.backend.helpers import BACKEND_CLI, BOB, maildir_files  # noqa: E402
from tests.bench.accept_bench import Backend, smtp_source  # noqa: E402

DEFAULT_JSON = ROOT / "bench-results" / "queue_growth.json"
DEFAULT_SIZES = (0, 10_000, 100_000, 1_000_000)
SEED_CHUNK = 50_000
PROBE = (b"From: <alice@example.org>\r\nTo: <bob@example.org>\r\nSubject: growth probe\r\n"
         b"Message-ID: <probe@example.org>\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n\r\nprobe\r\n")
TICKS = os.sysconf("SC_CLK_TCK")


def seed(queue_db: Path, n: int, now: float | None = None) -> float:
    """Put ``n`` deferred messages (one remote recipient each, next attempt 1 h to 4 days ahead) in the
    queue at ``queue_db`` in one commit through ``Queue.transact``, indexes rebuilt after it and the WAL
    checkpointed; returns the seconds it took."""
    from backend.queue.store import Queue

    now = time.time() if now is None else now
    q = Queue(queue_db, group_commit=False)
    t0 = time.perf_counter()

    def insert(conn, _now) -> None:
        for lo in range(0, n, SEED_CHUNK):
            ids = range(lo, min(n, lo + SEED_CHUNK))
            conn.executemany(
                "INSERT INTO message (id, created, sender, listener, client_addr, auth_user, size, content)"
                " VALUES (?,?,?,?,?,?,?,?)",
                ((f"SEED{i:012d}", now - 86400 + i % 86400, "alice@example.org", "lan", "127.0.0.1", None, 1, b"x")
                 for i in ids),
            )
            conn.executemany(
                "INSERT INTO recipient (message_id, address, orig_address, domain, local, state, attempts,"
                " next_attempt, last_attempt, last_reply, updated) VALUES (?,?,?,?,0,'deferred',?,?,?,?,?)",
                ((f"SEED{i:012d}", f"user{i}@remote{i % 997}.test", f"user{i}@remote{i % 997}.test",
                  f"remote{i % 997}.test", 1 + i % 5, now + 3600 + (i * 7919) % (4 * 86400), now - 600,
                  "451 4.4.0 seeded backlog", now) for i in ids),
            )

    def drop_indexes(conn, _now) -> list[str]:
        # Secondary indexes are built once after the bulk insert (sorted, ~10x faster than keeping them
        # up to date row by row); reopening the queue recreates them (schema.migrate).
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")]
        for name in names:
            conn.execute(f"DROP INDEX {name}")
        return names

    try:
        if n:
            q.transact(drop_indexes)
            q.transact(insert)
    finally:
        q.close()
    q = Queue(queue_db, group_commit=False)  # migrate: the indexes again
    try:
        # The backend starts on a checkpointed database, as after any restart: not on a 600 MB WAL that
        # each new connection would first have to index.
        q.read(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
    finally:
        q.close()
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def query_plans(queue_db: Path, with_cli: bool = True) -> tuple[dict[str, list[str]], dict[str, float]]:
    """EXPLAIN QUERY PLAN of the SELECTs the runner (claim_due, next_due_time, local and all) and the queue
    CLI (list, show) really run, captured from the store's connection with a trace callback, and the
    runner's queries timed in ms."""
    from backend.queue.store import Queue

    q = Queue(queue_db, group_commit=False)
    seen: list[str] = []
    conn = q._conn()
    conn.set_trace_callback(seen.append)
    try:
        for local in (None, True):
            q.next_due_time(local, frozenset())
            q.claim_due(10, lambda a: 60.0, local, frozenset())
        if with_cli:  # the whole list in this process (its plan does not depend on the queue's size)
            q.list(("queued", "deferred", "held"))
        try:
            q.get("SEED000000000000")
        except Exception:  # noqa: BLE001 - an empty queue: the plan is still what counts
            pass
    finally:
        conn.set_trace_callback(None)
    # The runner's queries timed in this process (median of 5): the cost of one round with nothing due.
    timings = {}
    for name, call in (("next_due_time(all)", lambda: q.next_due_time(None, frozenset())),
                       ("next_due_time(local)", lambda: q.next_due_time(True, frozenset())),
                       ("claim_due(all)", lambda: q.claim_due(200, lambda a: 60.0, None, frozenset())),
                       ("claim_due(local)", lambda: q.claim_due(200, lambda a: 60.0, True, frozenset()))):
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            runs.append((time.perf_counter() - t0) * 1000)
        timings[name] = round(sorted(runs)[2], 3)
    plans: dict[str, list[str]] = {}
    for sql in seen:
        if sql.lstrip().upper().startswith("SELECT") and sql not in plans:
            plans[sql] = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    q.close()
    return plans, timings


def _cli(cfg: Path, *args: str, timeout: float) -> float | None:
    t0 = time.perf_counter()
    try:
        subprocess.run([BACKEND_CLI, "queue", *args, "-c", str(cfg)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return round(time.perf_counter() - t0, 3)


def _first_delivery_ms(be: Backend, timeout: float = 60.0) -> float:
    """Send one message to a local mailbox; ms from the 250 to its Maildir file (the first attempt)."""
    before = len(maildir_files(be.work, BOB))
    with smtplib.SMTP("127.0.0.1", be.port, timeout=30) as s:
        s.sendmail("alice@example.org", [BOB], PROBE)
        t250 = time.perf_counter()
    deadline = t250 + timeout
    while len(maildir_files(be.work, BOB)) <= before:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no delivery to {BOB} within {timeout:.0f} s")
        time.sleep(0.002)
    return (time.perf_counter() - t250) * 1000


def _poke(queue_db: Path) -> None:
    from backend.queue.runner import poke_daemon

    poke_daemon(queue_db)


def _short(sql: str) -> str:
    head, _, rest = sql.partition(" FROM ")
    return f"{head[:40]}... FROM {rest.split(' WHERE ')[0][:30]}" + (" WHERE ..." if " WHERE " in rest else "")


def measure(size: int, work: Path, messages: int, idle_s: float, pokes: int, cli_timeout: float,
            delivery: str = "paused") -> dict:
    from backend.config import load_config

    hm = work / f"q{size}"
    hm.mkdir()
    be = Backend(hm, extra=f'[delivery]\npaused = {"true" if delivery == "paused" else "false"}\n'
                          'nameservers = ["127.0.0.1"]\ndns_port = 9\n')
    queue_db = load_config(be.cfg).queue_db
    r: dict = {"backlog": size, "seed_s": round(seed(queue_db, size), 2)}
    r["db_mib"] = round(sum(p.stat().st_size for p in queue_db.parent.glob(queue_db.name + "*")) / 2**20, 1)
    with be:
        pid = be.proc.pid
        _first_delivery_ms(be)  # warm-up: first connection, pages of the indexes
        time.sleep(0.5)
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        time.sleep(idle_s)
        r["idle_cpu_ms_per_s"] = round((cpu_seconds(pid) - c0) / (time.perf_counter() - t0) * 1000, 2)
        # A round of the runner with nothing due (what each wake-up by a commit or the CLI costs).
        c0 = cpu_seconds(pid)
        for _ in range(pokes):
            _poke(queue_db)
            time.sleep(0.05)
        r["cpu_ms_per_runner_round"] = round(max(0.0, cpu_seconds(pid) - c0) / pokes * 1000, 2)
        r["first_delivery_ms"] = round(sorted(_first_delivery_ms(be) for _ in range(5))[2], 2)  # median of 5
        t = smtp_source(be.port, 20, messages)
        r["accepts_per_s_20"] = round(messages / t, 1)
        r["rss_mib"] = round(rss_kib(pid) / 1024, 1)
        shows = [_cli(be.cfg, "show", "SEED000000000000", timeout=cli_timeout) for _ in range(3)]  # empty: "no message"
        r["queue_show_s"] = sorted(shows, key=lambda x: float("inf") if x is None else x)[1]
        r["queue_list_s"] = _cli(be.cfg, "list", timeout=cli_timeout)
    r["plans"], r["query_ms"] = query_plans(queue_db, with_cli=size <= 100_000)
    r["full_scans"] = sorted({_short(sql) for sql, plan in r["plans"].items() if any(p.startswith("SCAN") for p in plan)})
    r["sorts"] = sorted({_short(sql) for sql, plan in r["plans"].items() if any("TEMP B-TREE" in p for p in plan)})
    shutil.rmtree(hm, ignore_errors=True)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench queue_growth", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="backlog sizes (comma-separated)")
    ap.add_argument("--messages", type=int, default=500, help="messages for the accept rate at 20 sessions")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    ap.add_argument("--pokes", type=int, default=20, help="runner rounds woken through the CLI socket")
    ap.add_argument("--cli-timeout", type=float, default=180.0, help="give up on a queue command after this")
    ap.add_argument("--delivery", choices=("paused", "on"), default="paused", help="remote delivery (default paused)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results: dict = {"benchmark": "queue_growth", "cpus": os.cpu_count(), "delivery": args.delivery, "sizes": []}
    work = Path(tempfile.mkdtemp(prefix="homemx-bench-growth-"))
    try:
        for size in sizes:
            r = measure(size, work, args.messages, args.idle, args.pokes, args.cli_timeout, args.delivery)
            results["sizes"].append(r)
            print(f"  backlog {size:>8}: seeded in {r['seed_s']} s ({r['db_mib']} MiB), {r['accepts_per_s_20']} "
                  f"accepts/s @20, first delivery {r['first_delivery_ms']:.1f} ms, idle {r['idle_cpu_ms_per_s']} "
                  f"ms CPU/s, {r['cpu_ms_per_runner_round']} ms/round, RSS {r['rss_mib']} MiB, list "
                  f"{r['queue_list_s']} s, show {r['queue_show_s']} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nB7 cost as the queue grows ({os.cpu_count()} CPUs; backlog = deferred messages due later)")
    print(f"{'backlog':>9} {'seed s':>7} {'acc/s@20':>9} {'1st dlv ms':>10} {'idle ms/s':>9} {'ms/round':>9} "
          f"{'RSS MiB':>8} {'list s':>8} {'show s':>7}")
    for r in results["sizes"]:
        print(f"{r['backlog']:>9} {r['seed_s']:>7} {r['accepts_per_s_20']:>9} {r['first_delivery_ms']:>10.1f} "
              f"{r['idle_cpu_ms_per_s']:>9} {r['cpu_ms_per_runner_round']:>9} {r['rss_mib']:>8} "
              f"{r['queue_list_s'] if r['queue_list_s'] is not None else '>' + str(args.cli_timeout):>8} "
              f"{r['queue_show_s'] if r['queue_show_s'] is not None else '-':>7}")
        print(f"           runner queries ms: {r['query_ms']}")
        for s in r["full_scans"]:
            print(f"           full scan: {s}")
        for s in r["sorts"]:
            print(f"           sort (temp b-tree): {s}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
