"""The Grafana dashboard is valid, charts the metrics Cake exposes (names read from the code,
so a renamed metric fails here), and ships as a ConfigMap in both overlays."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cake_devtools.k8s_manifests import METRIC_NAME, RenderedOverlay, exposed_metric_series

DASHBOARD = Path("k8s/components/observability/grafana-dashboard-cake.json")
#: Metrics the dashboard must chart (issue 7): business counters, relay, gRPC servers.
REQUIRED_METRICS = {
    "cake_auth_logins_total",
    "cake_auth_registrations_total",
    "cake_promotions_enrollments_total",
    "cake_promotions_vouchers_issued_total",
    "cake_promotions_vouchers_used_total",
    "cake_promotions_topups_total",
    "cake_events_relay_published_total",
    "cake_events_relay_failed_attempts_total",
    "cake_events_relay_dead_lettered_total",
    "cake_events_outbox_backlog",
    "cake_events_outbox_lag_seconds",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
}


@pytest.fixture(scope="module")
def dashboard(repo: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((repo / DASHBOARD).read_text())
    return loaded


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), expr
            assert 'namespace=~"$namespace"' in expr, expr


def test_dashboard_charts_the_required_metrics(dashboard: dict[str, Any]) -> None:
    used = {name for expr in expressions(dashboard) for name in re.findall(METRIC_NAME, expr)}
    assert used >= REQUIRED_METRICS, f"not charted: {REQUIRED_METRICS - used}"


def test_every_charted_metric_is_exposed_by_the_code(dashboard: dict[str, Any], repo: Path) -> None:
    exposed = exposed_metric_series(repo)
    assert "cake_auth_logins_total" in exposed, "the source scan finds the collectors"
    used = {name for expr in expressions(dashboard) for name in re.findall(METRIC_NAME, expr)}
    assert used <= exposed, f"charted but defined nowhere: {sorted(used - exposed)}"


def test_dashboard_ships_as_a_labelled_config_map(
    overlays: dict[str, RenderedOverlay], repo: Path
) -> None:
    for overlay in overlays.values():
        config_map = overlay.get("ConfigMap", "grafana-dashboard-cake")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["data"][DASHBOARD.name] == (repo / DASHBOARD).read_text()
