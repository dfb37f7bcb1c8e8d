"""The shipped alert rules and dashboard against the lab: every metric they use is in a real scrape of both daemons,
and a real Prometheus scraping the lab sees HomemxTunnelDown's expression turn true when the tunnel is cut.

Why a real Prometheus rather than promtool over recorded scrapes: the home view of a tunnel outage is a *failed*
scrape of the gateway (its metrics are reached through the tunnel), which only Prometheus itself turns into
``up == 0`` and stale series; recorded samples would have to invent that. It runs as this test's own process on
loopback in the lab's home namespace, where an operator's Prometheus would run (docs/monitoring.md).
"""

from __future__ import annotations

import pytest

from tests.conftest import require_tool
from tests.lab.monitoring import Prometheus, rule_expr, scrape_names, used_metric_names
from tests.lab.topology import BACKEND_METRICS_PORT, GATEWAY_METRICS_PORT, GW_TUN, MailLab, wait_until


def test_every_metric_of_the_rules_and_the_dashboard_is_in_a_real_scrape(mail_lab: MailLab):
    lab = mail_lab
    gateway, backend = scrape_names(lab.scrape("gateway")), scrape_names(lab.scrape("backend"))
    assert "homemx_gateway_tunnel_handshake_age_seconds" in gateway  # the lab gateway exports its tunnel
    offered = gateway | backend | {"up"}  # up: Prometheus's own per-target series
    used = used_metric_names()
    assert len(used) > 25
    missing = {name: sorted(where) for name, where in used.items() if name not in offered}
    sampled = {s.split("{")[0].split(" ")[0] for s in (lab.scrape("gateway") + lab.scrape("backend")).splitlines()
               if s and not s.startswith("#")}
    # Declared (TYPE line) is what a rename breaks; a labelled counter has samples only once something happened.
    print("declared, no sample yet:", sorted(n for n in used if n in offered and n not in sampled | {"up"}))
    assert not missing, f"used by rules/dashboard but in neither scrape: {missing}"


@pytest.fixture
def prometheus(mail_lab: MailLab):
    require_tool("prometheus")
    lab = mail_lab
    prom = Prometheus(lab.home, {"homemx-backend": f"{lab.home_addr}:{BACKEND_METRICS_PORT}",
                                 "homemx-gateway": f"{GW_TUN}:{GATEWAY_METRICS_PORT}"}).start()
    try:
        yield prom
    finally:
        prom.close()


def targets_up(prom: Prometheus) -> dict[str, str]:
    return {s["metric"]["job"]: s["value"][1] for s in prom.query('up{job=~"homemx-.*"}')}


def test_cutting_the_tunnel_makes_tunnel_down_true_in_a_real_prometheus(mail_lab: MailLab, prometheus: Prometheus):
    lab, prom = mail_lab, prometheus
    expr = rule_expr("HomemxTunnelDown")
    wait_until(lambda: targets_up(prom) == {"homemx-backend": "1", "homemx-gateway": "1"}, 30, "both targets scraped")
    assert prom.query("homemx_gateway_tunnel_handshake_age_seconds")  # scraped through the tunnel
    assert prom.query(expr) == []  # healthy: false
    assert "HomemxTunnelDown" not in prom.alerts()

    lab.cut_tunnel()
    try:
        result = wait_until(lambda: prom.query(expr), 30, "HomemxTunnelDown's expression to hold")
        assert [s["metric"]["job"] for s in result] == ["homemx-gateway"]
        assert targets_up(prom) == {"homemx-backend": "1", "homemx-gateway": "0"}
        # The rule itself, loaded from the shipped file, is evaluated on it (pending for its 1 minute of `for`).
        wait_until(lambda: prom.alerts().get("HomemxTunnelDown") in ("pending", "firing"), 15, "the alert pending")
    finally:
        lab.restore_tunnel()
    wait_until(lambda: prom.query(expr) == [], 30, "HomemxTunnelDown's expression false again")
    assert targets_up(prom) == {"homemx-backend": "1", "homemx-gateway": "1"}
