"""Benchmark report: runs B1–B10 in one go and prints one table of homemx's figures beside the peer's (HAProxy, Postfix, OpenSSL), their ratio and the issue's target, also written as JSON.

    python -m tests.bench report [--quick] [--only B3,B6] [--out DIR]     (./dev bench runs this)

Each benchmark writes its own JSON into DIR (default bench-results/); the report adds
DIR/results.json with the machine description and every row of the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench-results"


def machine() -> dict:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    cpu = sh("lscpu | grep -E '^(Model name|Thread|Core|Socket|CPU MHz|Hypervisor)'")
    return {"nproc": sh("nproc"), "cpu": cpu, "memory": sh("free -h | sed -n 2p"),
            "disk": sh(f"df -hT {ROOT} | tail -1"), "kernel": platform.release(),
            "python": platform.python_version(), "openssl": sh("openssl version"),
            "postfix": sh("postconf -d mail_version 2>/dev/null"), "haproxy": sh("haproxy -v | head -1")}


def _row(bench: str, metric: str, homemx, peer, peer_name: str, target: str, ok: bool | None, unit: str) -> dict:
    ratio = round(homemx / peer, 3) if isinstance(homemx, (int, float)) and isinstance(peer, (int, float)) and peer else None
    return {"bench": bench, "metric": metric, "unit": unit, "homemx": homemx, "peer": peer, "peer_name": peer_name,
            "ratio": ratio, "target": target, "met": ok}


def run_gateway(quick: bool) -> list[dict]:
    from tests.bench import gateway_bench

    args = ["--messages", "100", "--rate-messages", "500", "--bulk-messages", "1", "--idle", "2000"] if quick else []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gateway_bench.main(args)
    out = buf.getvalue()
    print(out)
    num = r"\s+([\d.]+)"
    rows = {}
    for name in ("direct (no proxy)", "homemx-gateway", "haproxy 2.6"):
        m = re.search(re.escape(name) + num + r"\s+(\S+)" + num + num + r"\s+(\S+)", out)
        if m:
            rows[name] = m.groups()
    g, h = rows["homemx-gateway"], rows["haproxy 2.6"]
    added_g, added_h = float(g[1]), float(h[1])
    idle = re.search(r"KiB/idle conn @(\d+)", out).group(1)
    return [
        _row("B1", "added latency per transaction", added_g, added_h, "HAProxy", "<= 1.5x",
             added_g <= 1.5 * max(added_h, 1e-9), "ms"),
        _row("B1", "msgs/s at 20 sessions", float(g[2]), float(h[2]), "HAProxy", ">= 0.70x",
             float(g[2]) >= 0.7 * float(h[2]), "msg/s"),
        _row("B1", "10 MB message throughput", float(g[3]), float(h[3]), "HAProxy", "-", None, "MB/s"),
        _row("B2", f"memory per idle connection @{idle}", float(g[4]), float(h[4]), "HAProxy", "<= 10 KiB",
             float(g[4]) <= 10, "KiB"),
    ]


def run_dkim(quick: bool, out: Path) -> list[dict]:
    from tests.bench import dkim_bench

    path = out / "dkim.json"
    dkim_bench.main(["--seconds", "0.5" if quick else "1", "--json", str(path)])
    r = json.loads(path.read_text())
    rate = next(x["signs_per_s"] for x in r["results"] if x["algorithm"] == "rsa-sha256 (OpenSSL)" and x["size"] == "2KB")
    ossl = r["openssl_speed"].get("rsa2048_sign_per_s")
    ed = next(x["signs_per_s"] for x in r["results"] if x["algorithm"] == "ed25519-sha256" and x["size"] == "2KB")
    return [
        _row("B4", "RSA-2048 DKIM signs/s, 2 KB", rate, ossl, "openssl speed", ">= 0.50x",
             bool(ossl) and rate >= 0.5 * ossl, "sign/s"),
        _row("B4", "Ed25519 DKIM signs/s, 2 KB", ed, r["openssl_speed"].get("ed25519_sign_per_s"), "openssl speed",
             "-", None, "sign/s"),
    ]


def run_accept(quick: bool, out: Path) -> list[dict]:
    from tests.bench import accept_bench

    path = out / "accept.json"
    accept_bench.main((["--messages", "500", "--single", "100"] if quick else []) + ["--json", str(path)])
    r = json.loads(path.read_text())
    return [
        # Issue 17's floors; the servers alternate in rounds (accept_bench), so drift hits both.
        _row("B3", "durable accepts/s, 1 session", r["homemx_1"], r["postfix_1"], "Postfix", ">= 0.80x",
             r["homemx_1"] >= 0.8 * r["postfix_1"], "msg/s"),
        _row("B3", "durable accepts/s, 20 sessions", r["homemx_20"], r["postfix_20"], "Postfix", ">= 0.75x",
             r["homemx_20"] >= 0.75 * r["postfix_20"], "msg/s"),
        _row("B3", "disk fsync ceiling (4 KiB write+fsync)", r["fsync_per_s"], None, "-", "-", None, "/s"),
    ]


def run_e2e(quick: bool, out: Path) -> list[dict]:
    from tests.bench import e2e_bench

    path = out / "e2e.json"
    e2e_bench.main((["--messages", "500", "--latency", "100"] if quick else []) + ["--json", str(path)])
    r = json.loads(path.read_text())
    h, p = r["homemx"], r["postfix"]
    where = "(loopback)" if r.get("variant", "").startswith("loopback") else "(tunnel)"
    rows = [
        _row("B5", f"accepted msgs/s, 20 sessions {where}", h["accepted_per_s"], p["accepted_per_s"],
             "HAProxy+Postfix", ">= 0.65x", h["accepted_per_s"] >= 0.65 * p["accepted_per_s"], "msg/s"),
        _row("B5", f"delivered msgs/s, 20 sessions {where}", h["delivered_per_s"], p["delivered_per_s"],
             "HAProxy+Postfix", ">= 0.65x", h["delivered_per_s"] >= 0.65 * p["delivered_per_s"], "msg/s"),
        _row("B5", "p50 time to 250", h["p50_ms"], p["p50_ms"], "HAProxy+Postfix", "-", None, "ms"),
        _row("B5", "p99 time to 250", h["p99_ms"], p["p99_ms"], "HAProxy+Postfix", "<= 1.0x",
             h["p99_ms"] <= p["p99_ms"], "ms"),
        _row("B5", "CPU s of every process during the load", h.get("cpu_total_s"), p.get("cpu_total_s"),
             "HAProxy+Postfix", "-", None, "s"),
    ]
    d = r.get("postfix_dkim")
    if d:  # the peer doing the same work: OpenDKIM signs RSA + Ed25519 as a milter
        name = "HAProxy+Postfix+OpenDKIM"
        rows += [
            _row("B5", f"accepted msgs/s, signing peer {where}", h["accepted_per_s"], d["accepted_per_s"], name,
                 ">= 0.65x", h["accepted_per_s"] >= 0.65 * d["accepted_per_s"], "msg/s"),
            _row("B5", f"delivered msgs/s, signing peer {where}", h["delivered_per_s"], d["delivered_per_s"], name,
                 ">= 0.65x", h["delivered_per_s"] >= 0.65 * d["delivered_per_s"], "msg/s"),
            _row("B5", "p99 time to 250, signing peer", h["p99_ms"], d["p99_ms"], name, "<= 1.0x",
                 h["p99_ms"] <= d["p99_ms"], "ms"),
            _row("B5", "CPU s of every process, signing peer", h.get("cpu_total_s"), d.get("cpu_total_s"), name,
                 "-", None, "s"),
        ]
    return rows


def run_fairness(quick: bool, out: Path) -> list[dict]:
    from tests.bench import fairness_bench

    path = out / "fairness.json"
    fairness_bench.main((["--small", "100"] if quick else []) + ["--json", str(path)])
    r = json.loads(path.read_text())
    return [
        _row("B6", "small-message p50 during 25 MB (vs idle)", r["loaded"]["p50_ms"], r["idle"]["p50_ms"],
             "homemx idle", "-", None, "ms"),
        _row("B6", "small-message p99 during 25 MB (vs idle)", r["loaded"]["p99_ms"], r["idle"]["p99_ms"],
             "homemx idle", "<= 3x", r["loaded"]["p99_ms"] <= 3 * r["idle"]["p99_ms"], "ms"),  # issue 17's floor
    ]


def run_inbound(quick: bool, out: Path) -> list[dict]:
    from tests.bench import inbound_bench

    path = out / "inbound.json"
    inbound_bench.main((["--messages", "60"] if quick else []) + ["--json", str(path)])
    r = json.loads(path.read_text())
    rows = []
    checks = {"auth": "SPF+DKIM+ARC+DMARC", "rspamd": "checks + rspamd"}
    for s in (1, 10):
        for config, name in checks.items():
            c = r[config][f"s{s}"]
            rows += [_row("B9", f"added p50 @{s}, {name}", c["added_p50_ms"], None, "-", "-", None, "ms"),
                     _row("B9", f"added p99 @{s}, {name}", c["added_p99_ms"], None, "-", "-", None, "ms")]
        for config, name in checks.items():
            rows.append(_row("B9", f"mx msgs/s @{s}, {name}", r[config][f"s{s}"]["msgs_per_s"],
                             r["none"][f"s{s}"]["msgs_per_s"], "no checks", "-", None, "msg/s"))
        if "postfix_rspamd" in r:  # the peer doing the same work (issue 17): Postfix + rspamd's milter
            h, p = r["rspamd"][f"s{s}"], r["postfix_rspamd"][f"s{s}"]
            peer = "Postfix+rspamd milter"
            rows += [_row("B9", f"msgs/s @{s} with checks + rspamd", h["msgs_per_s"], p["msgs_per_s"], peer, "-",
                          None, "msg/s"),
                     _row("B9", f"p99 '.' to 250 @{s} with checks + rspamd", h["p99_ms"], p["p99_ms"], peer, "-",
                          None, "ms"),
                     _row("B9", f"added p99 @{s} by the checks (vs peer's)", h["added_p99_ms"], p["added_p99_ms"],
                          peer, "-", None, "ms")]
    return rows


def run_api(quick: bool, out: Path) -> list[dict]:
    from tests.bench import api_bench

    path = out / "api.json"
    api_bench.main((["--messages", "500", "--single", "100"] if quick else []) + ["--json", str(path)])
    r = json.loads(path.read_text())
    return [
        _row("B10", f"API msgs/s, {n} client{'s' if n > 1 else ''} (vs SMTP lan)", r["api"][f"c{n}"]["msgs_per_s"],
             r["smtp"][f"c{n}"]["msgs_per_s"], "SMTP lan", "-", None, "msg/s")
        for n in (1, 10)
    ]


def run_queue_growth(quick: bool, out: Path) -> list[dict]:
    from tests.bench import queue_growth_bench

    path = out / "queue_growth.json"
    queue_growth_bench.main((["--sizes", "0,10000,100000", "--messages", "200", "--idle", "2", "--pokes", "10"]
                             if quick else []) + ["--json", str(path)])
    r = json.loads(path.read_text())
    sizes = r["sizes"]
    base = sizes[0]
    rows = []
    for s in sizes[1:]:
        n = f"{s['backlog']:,}"
        rows += [
            _row("B7", f"accepts/s @20 with {n} deferred (vs empty)", s["accepts_per_s_20"], base["accepts_per_s_20"],
                 "empty queue", ">= 0.50x", s["accepts_per_s_20"] >= 0.5 * base["accepts_per_s_20"], "msg/s"),
            _row("B7", f"250 to first delivery, {n} deferred", s["first_delivery_ms"], base["first_delivery_ms"],
                 "empty queue", "<= 3x", s["first_delivery_ms"] <= 3 * max(base["first_delivery_ms"], 1.0), "ms"),
            _row("B7", f"runner round CPU, {n} deferred", s["cpu_ms_per_runner_round"],
                 base["cpu_ms_per_runner_round"], "empty queue", "-", None, "ms"),
            _row("B7", f"idle CPU per s, {n} deferred", s["idle_cpu_ms_per_s"], base["idle_cpu_ms_per_s"],
                 "empty queue", "-", None, "ms/s"),
            _row("B7", f"backend RSS, {n} deferred", s["rss_mib"], base["rss_mib"], "empty queue", "-", None, "MiB"),
            _row("B7", f"queue show, {n} deferred", s["queue_show_s"], base["queue_show_s"], "empty queue", "-",
                 None, "s"),
            _row("B7", f"queue list, {n} deferred", s["queue_list_s"], base["queue_list_s"], "empty queue", "-",
                 None, "s"),
        ]
    last = sizes[-1]
    rows.append(_row("B7", f"local-only runner query, {last['backlog']:,} deferred",
                     last["query_ms"]["next_due_time(local)"], base["query_ms"]["next_due_time(local)"], "empty queue",
                     "<= 1 ms", last["query_ms"]["next_due_time(local)"] <= 1.0, "ms"))
    # The runner's queries must not scan the table, whatever the size (the CLI's list reads it all by design).
    scans = sorted({q for s in sizes for q in s["full_scans"] if "next_attempt" in q or "r.attempts" in q})
    rows.append(_row("B7", "runner queries with a full scan", len(scans), 0, "-", "0", not scans, "queries"))
    return rows


def run_flood(quick: bool, out: Path) -> list[dict]:
    from tests.bench import flood_bench

    path = out / "flood.json"
    flood_bench.main((["--flood", "2000", "--trickle", "40"] if quick else []) + ["--json", str(path)])
    r = json.loads(path.read_text())
    g, h = r["homemx-gateway"], r["haproxy"]
    n = f"{r['flood']:,}"
    return [
        # Issue 17 sets no floor for B8: the figures stand beside HAProxy's.
        _row("B8", f"trickle p99 during the {n}-connection burst", g["burst"].get("p99_ms"), h["burst"].get("p99_ms"),
             "HAProxy", "-", None, "ms"),
        _row("B8", f"trickle p99 with {n} silent connections held", g["flood"]["p99_ms"], h["flood"]["p99_ms"],
             "HAProxy", "-", None, "ms"),
        _row("B8", "trickle p99, no flood", g["quiet"]["p99_ms"], h["quiet"]["p99_ms"], "HAProxy", "-", None, "ms"),
        _row("B8", f"seconds to hold all {n}", g["absorb_s"], h["absorb_s"], "HAProxy", "-", None, "s"),
        _row("B8", f"proxy RSS with {n} held", g["rss_mib_flood"], h["rss_mib_flood"], "HAProxy", "-", None, "MiB"),
        _row("B8", "trickle transactions failed", g["burst"].get("failures", 0) + g["flood"]["failures"],
             h["burst"].get("failures", 0) + h["flood"]["failures"], "HAProxy", "0",
             g["burst"].get("failures", 0) + g["flood"]["failures"] == 0, "count"),
    ]


RUNNERS = {"B1": run_gateway, "B4": run_dkim, "B3": run_accept, "B5": run_e2e, "B6": run_fairness,
           "B7": run_queue_growth, "B8": run_flood, "B9": run_inbound, "B10": run_api}


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and v < 10 else f"{v:.1f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench report", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a few minutes instead of ~15)")
    ap.add_argument("--only", default="", help="comma-separated subset, e.g. B3,B6 (B1 also gives B2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for the JSON files (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = [b.strip().upper() for b in args.only.split(",") if b.strip()] or list(RUNNERS)
    rows: list[dict] = []
    errors: dict[str, str] = {}
    t0 = time.monotonic()
    for name in wanted:
        print(f"== {name}", flush=True)
        try:
            rows += RUNNERS[name](args.quick) if name == "B1" else RUNNERS[name](args.quick, args.out)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name} failed: {errors[name]}", file=sys.stderr)
    rows.sort(key=lambda r: int(r["bench"][1:]))  # B10 after B9
    print(f"\nhomemx benchmarks ({os.cpu_count()} CPUs, {time.monotonic() - t0:.0f} s{', quick' if args.quick else ''})")
    print(f"{'':4} {'metric':44} {'homemx':>9} {'peer':>9} {'ratio':>7}  {'target':10} {'met':4} peer")
    for r in rows:
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        print(f"{r['bench']:4} {r['metric'] + ' (' + r['unit'] + ')':44} {fmt(r['homemx']):>9} {fmt(r['peer']):>9} "
              f"{fmt(r['ratio']):>7}  {r['target']:10} {met:4} {r['peer_name']}")
    for name, err in errors.items():
        print(f"{name}: FAILED {err}")
    result = {"machine": machine(), "quick": args.quick, "rows": rows, "errors": errors}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
