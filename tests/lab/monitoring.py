"""The shipped monitoring files seen by tests: the PromQL of the alert rules and the dashboard, the metric names it
uses and those a scrape offers, and a real Prometheus run as our own process in a lab namespace."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.lab.ports import free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "provision" / "monitoring" / "homemx-alerts.yml"
DASHBOARD = REPO / "provision" / "monitoring" / "homemx-dashboard.json"

# Our metrics, and the one Prometheus adds per target. A quoted label value such as "upstream_unavailable" is not a
# name; "up" is a name only as a whole word.
_NAME = re.compile(r'(?<![\w"])(homemx_[a-z0-9_]+|up)(?![\w"])')
# What a family declared in the text format gives the query language (prometheus_client writes _created too).
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "summary": ("_count", "_sum", "_created"), "gauge": ("",), "unknown": ("",), "info": ("_info",)}


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def rule_expr(alert: str) -> str:
    return next(r["expr"] for r in alert_rules() if r["alert"] == alert)


def dashboard_exprs() -> list[str]:
    """Every target expression of every panel (rows included)."""
    def walk(panels):
        for p in panels:
            yield from (t["expr"] for t in p.get("targets", []))
            yield from walk(p.get("panels", []))
    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def used_metric_names() -> dict[str, set[str]]:
    """Metric name -> where it is used ('alert X' / 'dashboard')."""
    used: dict[str, set[str]] = {}
    for r in alert_rules():
        for n in metric_names(r["expr"]):
            used.setdefault(n, set()).add(f"alert {r['alert']}")
    for e in dashboard_exprs():
        for n in metric_names(e):
            used.setdefault(n, set()).add("dashboard")
    return used


def scrape_names(text: str) -> set[str]:
    """The series names a Prometheus text scrape declares (a labelled counter nobody incremented yet is declared
    by its TYPE line with no samples: a rule on it is right, it just has nothing to count)."""
    names = set()
    for f in text_string_to_metric_families(text):
        names.update(f.name + s for s in _SUFFIXES.get(f.type, ("",)))
        names.update(s.name for s in f.samples)
    return names


class Prometheus:
    """/usr/bin/prometheus (Debian's package) with our rules, scraping ``targets`` ({job: "host:port"}) every second,
    its API on 127.0.0.1 inside ``ns``. Our own process with its own config and data dir: the system service is
    never involved."""

    def __init__(self, ns, targets: dict[str, str]):
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix="hx-prom-"))
        self.port = free_port()
        shutil.copy(RULES, self.dir / RULES.name)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(self.dir / RULES.name)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [t]}]} for job, t in targets.items()],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = self.dir / "prometheus.log"
        self.proc = None

    def start(self) -> "Prometheus":
        self.proc = self.ns.popen(
            [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/-/ready")
                return self
            except RuntimeError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus did not start:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.2)

    def get(self, path: str, **params: str) -> str:
        code = ("import sys, urllib.request, urllib.parse\n"
                "u = sys.argv[1] + ('?' + urllib.parse.urlencode(dict(zip(sys.argv[2::2], sys.argv[3::2]))) "
                "if len(sys.argv) > 2 else '')\n"
                "sys.stdout.write(urllib.request.urlopen(u, timeout=5).read().decode())")
        args = [x for kv in params.items() for x in kv]
        r = self.ns.run([sys.executable, "-c", code, f"http://127.0.0.1:{self.port}{path}", *args], check=False)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-500:])
        return r.stdout

    def query(self, expr: str) -> list[dict]:
        """The instant vector ``expr`` evaluates to now (empty: false, for an alert expression)."""
        doc = json.loads(self.get("/api/v1/query", query=expr))
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def alerts(self) -> dict[str, str]:
        """Alert name -> state (pending, firing) of the active alerts."""
        doc = json.loads(self.get("/api/v1/alerts"))
        return {a["labels"]["alertname"]: a["state"] for a in doc["data"]["alerts"]}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
