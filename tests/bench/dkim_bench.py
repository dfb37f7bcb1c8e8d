"""DKIM signing benchmark: signs/s per algorithm (RSA through OpenSSL, RSA in dkimpy's pure Python, Ed25519) and message size, beside `openssl speed` from the same run.

    python -m tests.bench dkim [--seconds S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from backend.dkim import keys as dkim_keys
from backend.dkim import sign as dkim

SIZES = (("2KB", 2 * 1024), ("50KB", 50 * 1024), ("1MB", 1024 * 1024))
DEFAULT_JSON = Path(tempfile.gettempdir()) / "homemx-bench" / "dkim.json"


def make_message(size: int) -> bytes:
    head = (
        b"From: Alice <alice@example.org>\r\nTo: Bob <bob@remote.test>\r\nSubject: benchmark\r\n"
        b"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, then files a DKIM report.   \r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body.rpartition(b"\r\n")[0] + b"\r\n"


def measure(fn, seconds: float, min_runs: int = 3) -> tuple[float, int]:
    """(signs per second, runs) over at least ``seconds`` and ``min_runs`` calls."""
    fn()  # warm-up: key load and cache
    runs = 0
    start = time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= min_runs:
            return runs / elapsed, runs


def openssl_speed(seconds: int) -> dict:
    """Parse `openssl speed -seconds N rsa2048 ed25519` sign/s figures (None when openssl is missing)."""
    if shutil.which("openssl") is None:
        return {"error": "openssl not installed"}
    r = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), "rsa2048", "ed25519"], capture_output=True, text=True
    )
    out = r.stdout
    res: dict = {"version": subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()}
    m = re.search(r"^rsa\s+2048 bits\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", out, re.M)
    if m:
        res["rsa2048_sign_per_s"] = float(m.group(1))
        res["rsa2048_verify_per_s"] = float(m.group(2))
    m = re.search(r"\(Ed25519\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", out)
    if m:
        res["ed25519_sign_per_s"] = float(m.group(1))
        res["ed25519_verify_per_s"] = float(m.group(2))
    if r.returncode != 0:
        res["error"] = r.stderr.strip()[-500:]
    return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench dkim", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per cell (default 1)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write results here (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="homemx-dkim-bench-") as d:
        rsa_key = dkim_keys.generate_key("example.org", "rsa1", "rsa", d)
        ed_key = dkim_keys.generate_key("example.org", "ed1", "ed25519", d)
        rsa = SimpleNamespace(domain="example.org", selector="rsa1", algorithm="rsa", private_key=rsa_key.path)
        ed = SimpleNamespace(domain="example.org", selector="ed1", algorithm="ed25519", private_key=ed_key.path)
        variants = {
            # As the accept path signs (its content is CRLF-canonical already: canonical=True);
            # DSNs and reports are signed with the check (one more pass, ~1.8 ms per MB).
            "rsa-sha256 (OpenSSL)": lambda m: dkim.sign_message(m, [rsa], canonical=True),
            "rsa-sha256 (dkimpy pure)": lambda m: dkim.sign_message(m, [rsa], _fast_rsa=False),
            "ed25519-sha256": lambda m: dkim.sign_message(m, [ed], canonical=True),
            "both (default: rsa+ed25519)": lambda m: dkim.sign_message(m, [rsa, ed], canonical=True),
        }
        rows = []
        for label, size in SIZES:
            msg = make_message(size)
            for name, fn in variants.items():
                rate, runs = measure(lambda: fn(msg), args.seconds)
                rows.append({"algorithm": name, "size": label, "bytes": len(msg), "signs_per_s": round(rate, 1),
                             "ms_per_sign": round(1000 / rate, 3), "runs": runs})  # fmt: skip
                print(f"  {name:<28} {label:>5}  {rate:9.1f}/s  {1000 / rate:8.3f} ms", file=sys.stderr, flush=True)

    ossl = openssl_speed(max(1, round(args.seconds)))

    print(f"DKIM signing on {platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}, one thread)")
    print(f"{'algorithm':<28} " + " ".join(f"{label:>12}" for label, _ in SIZES) + "   (signs/s)")
    for name in variants:
        cells = [next(r for r in rows if r["algorithm"] == name and r["size"] == label) for label, _ in SIZES]
        print(f"{name:<28} " + " ".join(f"{c['signs_per_s']:>12.1f}" for c in cells))
    print(f"openssl speed ({ossl.get('version', '?')}): rsa2048 sign {ossl.get('rsa2048_sign_per_s', '?')}/s, "
          f"ed25519 sign {ossl.get('ed25519_sign_per_s', '?')}/s (raw signature, no message hashing)")  # fmt: skip

    result = {
        "benchmark": "dkim",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds_per_cell": args.seconds,
        "results": rows,
        "openssl_speed": ossl,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
