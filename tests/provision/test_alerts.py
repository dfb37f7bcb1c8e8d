"""The Prometheus alert rules (provision/monitoring/homemx-alerts.yml): promtool accepts them, every alert fires on
its input series and stays quiet on a near miss, and each one has a troubleshooting entry in the operator guide."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "provision" / "monitoring" / "homemx-alerts.yml"
RULE_TESTS = Path(__file__).with_name("alerts_test.yml")
GUIDE = REPO / "docs" / "operator-guide.md"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    require_tool("promtool")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules_accepts_the_file():
    r = promtool("check", "rules", str(RULES), cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout


def test_promtool_test_rules_passes():
    r = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_firing_case_and_a_quiet_case():
    cases: dict[str, set[str]] = {}
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for a in t.get("alert_rule_test", []):
            cases.setdefault(a["alertname"], set()).add("fires" if a["exp_alerts"] else "quiet")
    assert {a["alert"]: cases.get(a["alert"], set()) for a in alerts()} == {
        a["alert"]: {"fires", "quiet"} for a in alerts()}


@pytest.mark.parametrize("mutation", ["never", "always"])
def test_promtool_tests_catch_a_broken_expression(tmp_path, mutation):
    """The unit tests can fail: with every expression replaced by one that never (or always) holds, promtool test
    rules fails on every alert (its firing case, or its quiet case)."""
    doc = yaml.safe_load(RULES.read_text())
    for g in doc["groups"]:
        for r in g["rules"]:
            r["expr"] = "vector(1) == 0" if mutation == "never" else "vector(1)"
    (tmp_path / "provision" / "monitoring").mkdir(parents=True)
    (tmp_path / "provision" / "monitoring" / RULES.name).write_text(yaml.safe_dump(doc))
    (tmp_path / "tests" / "provision").mkdir(parents=True)
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "provision" / RULE_TESTS.name)
    r = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path / "tests" / "provision")
    assert r.returncode != 0
    failed = set(re.findall(r"alertname: (\w+),", r.stdout + r.stderr))
    assert failed == {a["alert"] for a in alerts()}


def troubleshooting_headings() -> list[str]:
    text = GUIDE.read_text()
    section = text.split("\n## 7. Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^### (\S+)\s*$", section, re.M)


def test_every_alert_says_what_to_do_and_has_a_guide_entry():
    headings = troubleshooting_headings()
    for a in alerts():
        ann = a["annotations"]
        anchor = f"docs/operator-guide.md#{a['alert'].lower()}"  # GitHub's anchor of "### HomemxTunnelDown"
        assert ann["summary"] and ann["runbook"] == anchor, a["alert"]
        assert anchor in ann["description"], a["alert"]
        assert a["alert"] in headings, f"no '### {a['alert']}' under Troubleshooting in {GUIDE.name}"
        assert a["labels"]["severity"] in ("warning", "critical")


def test_dashboard_is_grafana_json_and_every_query_is_valid_promql(tmp_path):
    from tests.lab.monitoring import DASHBOARD, dashboard_exprs, metric_names

    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "homemx" and dash["schemaVersion"] >= 36
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and all(p["targets"] and p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # promtool parses each query as a recording rule; Grafana fills $__rate_interval in (at least 4 scrapes).
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"homemx:dashboard_query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard-queries.yml").write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", str(tmp_path / "dashboard-queries.yml"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # The list: tunnel, edge outcomes, mail flow, queue, latency, verdicts, rspamd, certificate days left.
    used = set().union(*map(metric_names, exprs))
    for name in ("homemx_gateway_tunnel_handshake_age_seconds", "homemx_gateway_connections_total",
                 "homemx_backend_messages_received_total", "homemx_backend_delivery_attempts_total",
                 "homemx_backend_queue_recipients", "homemx_backend_queue_oldest_age_seconds",
                 "homemx_backend_delivery_duration_seconds_bucket", "homemx_backend_auth_verdicts_total",
                 "homemx_backend_rspamd_available", "homemx_backend_cert_expiry_timestamp_seconds"):
        assert name in used, name
