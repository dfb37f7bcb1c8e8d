"""The backend's periodic DNS self-check: ``dns check`` (backend/dns/check.py) every
``[dns] self_check_interval``, each check's result as a metric, the last result in
data_dir/dns-check.json (``homemx-backend status`` reads it), and one log line when a check's
result changes (not one per run: a record broken for a week is logged once, and once when fixed).

The checks are blocking dnspython lookups, several seconds each when a server does not answer,
so they run in a thread of their own. A daemon thread rather than an executor's: a shutdown never
waits for a slow lookup (an executor's threads are joined at exit).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from backend.config import BackendConfig
from backend.dns.check import CheckReport, resolver_for, run_checks
from backend.dns.lookup import DNSLookup
from backend.durable import write_atomic
from backend.metrics import BackendMetrics

log = logging.getLogger("homemx.dns")

RESULT_FILE = "dns-check.json"
QUERY_TIMEOUT = 5.0  # per lookup, as `dns check` does by default
SELF_CHECK = "self-check"  # the name of the one failing check when the checks could not run at all


def result_path(config: BackendConfig) -> Path:
    return config.server.data_dir / RESULT_FILE


def read_result(config: BackendConfig) -> dict | None:
    """The last stored self-check result ({"timestamp", "ok", "checks": [{name, ok, detail}]}), or
    None when there is none (never run, or the file is unreadable)."""
    try:
        doc = json.loads(result_path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Written by us, but a damaged file must neither stop the daemon's start nor the status command.
    if (not isinstance(doc, dict) or not isinstance(doc.get("timestamp"), (int, float))
            or not isinstance(doc.get("checks"), list)
            or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("ok"), bool)
                       for c in doc["checks"])):
        return None
    return doc


class DNSSelfCheck:
    """Runs the checks, records their result, and logs what changed since the last recorded one
    (also across restarts: the previous result is read back from the file)."""

    def __init__(self, config: BackendConfig, metrics: BackendMetrics, now: Callable[[], float] = time.time):
        self.config = config
        self.metrics = metrics
        self.now = now
        self.interval = config.dns.self_check_interval
        last = read_result(config)
        self.last_run: float | None = last["timestamp"] if last else None
        self.previous: dict[str, bool] = {c["name"]: c["ok"] for c in last["checks"]} if last else {}
        if last:
            # A restart keeps the metrics of the stored result until the next run is due.
            self._set_metrics(self.previous, self.last_run)

    def check_once(self) -> CheckReport:
        """One run (blocking): check, store, set the metrics, log the changes. Never raises."""
        try:
            report = run_checks(self.config, DNSLookup(resolver_for(self.config, QUERY_TIMEOUT)))
        except Exception as e:  # noqa: BLE001 - e.g. no resolv.conf: reported as a failing check, the loop goes on
            report = CheckReport()
            report.add(SELF_CHECK, False, f"the checks could not run: {type(e).__name__}: {e}")
        when = self.now()
        results = {r.name: r.ok for r in report.results}
        self._log_changes(report)
        self._set_metrics(results, when)
        for gone in set(self.previous) - set(results):  # a check the config no longer has
            self._forget(gone)
        self.previous, self.last_run = results, when
        doc = {"timestamp": when, "interval": self.interval, **report.to_json()}
        try:
            result_path(self.config).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(result_path(self.config), json.dumps(doc, indent=1).encode(), 0o644)
        except OSError as e:
            log.error("dns self-check: cannot store the result in %s: %s", result_path(self.config), e)
        return report

    def _log_changes(self, report: CheckReport) -> None:
        for r in report.results:
            before = self.previous.get(r.name)
            if r.ok == before or (before is None and r.ok):
                continue  # unchanged, or a new check that passes: nothing to tell
            if r.ok:
                log.info("dns self-check: %s passes again: %s", r.name, r.detail)
            else:
                log.warning("dns self-check: %s fails: %s", r.name, r.detail)

    def _set_metrics(self, results: dict[str, bool], when: float) -> None:
        for name, ok in results.items():
            self.metrics.dns_check_ok.labels(name).set(1 if ok else 0)
        self.metrics.dns_check_timestamp.set(when)

    def _forget(self, name: str) -> None:
        try:
            self.metrics.dns_check_ok.remove(name)
        except KeyError:
            pass

    async def run(self) -> None:
        """Check now (or when the stored result is due for renewal), then every interval."""
        if self.last_run is not None:
            await asyncio.sleep(max(0.0, self.last_run + self.interval - self.now()))
        while True:
            await in_daemon_thread(self.check_once, "dns-self-check")
            await asyncio.sleep(self.interval)


def in_daemon_thread(fn: Callable[[], object], name: str) -> asyncio.Future:
    """``fn()`` in a new daemon thread, awaited as a future of the running loop. Cancelling the
    future abandons the thread's result; the thread itself ends when ``fn`` returns."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def work() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop has closed (the daemon stopped meanwhile)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future
