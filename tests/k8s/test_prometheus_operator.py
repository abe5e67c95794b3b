"""k8s/components/prometheus-operator, rendered with kustomize on top of the dev overlay: the
ServiceMonitors find Services with the named port and pods that serve it, the network policy
lets Prometheus in, and every alert is well formed and names only metrics that exist (the
services' collectors, the Kafka Exporter's lag; Envoy's are checked against a real Envoy in
test_gateway_ops_port.py). promtool is not needed: the expressions are checked here for the
names they use and their balance, and Prometheus parses them when the operator loads them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cake_devtools.k8s_manifests import (
    METRIC_NAME,
    RenderedOverlay,
    exposed_metric_series,
    labels_match,
    pod_spec,
)
from cake_notifications.adapters.metrics import PrometheusNotificationMetrics
from prometheus_client import CollectorRegistry

COMPONENT = Path("k8s/components/prometheus-operator")
ALERTS = {
    "CakeRelayBacklog",
    "CakeDeadLettersGrowing",
    "CakeConsumerLag",
    "CakeGateway5xxRatio",
    "CakeLoginSlow",
    "CakeNotificationsFailing",
    "CakeNotificationsNotSending",
    "CakeNotificationsLate",
}
OPERATOR_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


@pytest.fixture(scope="module")
def monitored(
    repo: Path, dev: RenderedOverlay, tmp_path_factory: pytest.TempPathFactory
) -> RenderedOverlay:
    """The dev overlay with the component added, as an operator's cluster would run it (an
    overlay that lists the component puts its objects in the overlay's namespace)."""
    overlay = tmp_path_factory.mktemp("monitored")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": dev.namespace,
                # kustomize takes no absolute roots: relative ones, wherever the repository is.
                "resources": [os.path.relpath(repo / "k8s" / "overlays" / "dev", overlay)],
                "components": [os.path.relpath(repo / COMPONENT, overlay)],
            }
        )
    )
    return RenderedOverlay.build(overlay)


def rules(monitored: RenderedOverlay) -> list[dict[str, Any]]:
    rule = monitored.get("PrometheusRule", "cake-alerts")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_no_overlay_needs_the_operator(overlays: dict[str, RenderedOverlay]) -> None:
    # The CRDs exist only where the operator is installed; a plain cluster must apply cleanly.
    for overlay in overlays.values():
        assert overlay.of_kind(*OPERATOR_KINDS) == [], overlay.name


def test_service_monitors_reach_a_container_port(monitored: RenderedOverlay) -> None:
    services = monitored.of_kind("Service")
    workloads = monitored.workloads()
    scraped: dict[str, set[str]] = {}
    for monitor in monitored.of_kind("ServiceMonitor"):
        assert monitor["metadata"]["namespace"] == monitored.namespace
        selected = [
            s
            for s in services
            if labels_match(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            for service in selected:
                (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
                pods = [
                    w
                    for w in workloads
                    if labels_match(
                        {"matchLabels": service["spec"]["selector"]},
                        pod_spec_labels(w),
                    )
                ]
                assert pods, service["metadata"]["name"]
                for workload in pods:
                    named = {
                        p["name"]: p["containerPort"]
                        for c in pod_spec(workload)["containers"]
                        for p in c.get("ports", [])
                    }
                    assert port["targetPort"] in named, (service["metadata"]["name"], named)
                    assert named[port["targetPort"]] == port["port"]
                scraped.setdefault(service["metadata"]["name"], set()).add(endpoint["path"])
    assert scraped == {
        "auth": {"/metrics"},
        "promotions": {"/metrics"},
        "events": {"/metrics"},
        "notifications": {"/metrics"},
        "gateway": {"/stats/prometheus"},
    }


def pod_spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


def test_prometheus_may_scrape_the_monitored_ports(monitored: RenderedOverlay) -> None:
    policy = monitored.get("NetworkPolicy", "allow-prometheus-scrape")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    monitored_ports = {
        endpoint["port"]
        for monitor in monitored.of_kind("ServiceMonitor")
        for endpoint in monitor["spec"]["endpoints"]
    }
    assert monitored_ports == {"metrics", "ops"}
    assert monitored_ports <= allowed


def test_kafka_exporter_is_scraped_where_strimzi_runs_it(repo: Path) -> None:
    kafka = next(
        doc
        for doc in yaml.safe_load_all(
            (repo / "k8s/components/strimzi-kafka/kafka.yaml").read_text()
        )
        if doc and doc["kind"] == "Kafka"
    )
    monitors = yaml.safe_load_all((repo / COMPONENT / "monitors.yaml").read_text())
    (pod_monitor,) = [m for m in monitors if m and m["kind"] == "PodMonitor"]
    selector = pod_monitor["spec"]["selector"]["matchLabels"]

    # The consumer groups CakeConsumerLag watches (each service's CONSUMER_GROUP default).
    for group in ("promotions", "notifications"):
        assert re.fullmatch(kafka["spec"]["kafkaExporter"]["groupRegex"], group), group
    # Strimzi names the exporter's pods <cluster>-kafka-exporter and labels them so.
    assert selector["strimzi.io/name"] == f"{kafka['metadata']['name']}-kafka-exporter"
    assert selector["strimzi.io/cluster"] == kafka["metadata"]["name"]


def test_the_alerts_are_there_and_well_formed(monitored: RenderedOverlay) -> None:
    found = rules(monitored)
    assert {r["alert"] for r in found} == ALERTS
    for rule in found:
        expr = rule["expr"]
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), rule["alert"]
        assert re.search(r"[<>]=?\s*[0-9.]+\s*$", expr), f"{rule['alert']}: no threshold"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert re.fullmatch(r"[0-9]+[smh]", rule["for"])


def test_alerts_name_only_metrics_that_exist(monitored: RenderedOverlay, repo: Path) -> None:
    exposed = exposed_metric_series(repo)
    names = {name for rule in rules(monitored) for name in re.findall(METRIC_NAME, rule["expr"])}
    assert "grpc_server_handling_seconds_bucket" in names
    assert names <= exposed, f"alerting on metrics defined nowhere: {sorted(names - exposed)}"
    others = {
        name
        for rule in rules(monitored)
        # A metric name is followed by its label matchers; label names by `=`.
        for name in re.findall(r"\b(?:kafka|envoy)_\w+(?=\{)", rule["expr"])
    }
    # The Kafka Exporter's (see above) and Envoy's (test_gateway_ops_port.py).
    assert others == {"kafka_consumergroup_lag", "envoy_http_downstream_rq_xx"}


def test_login_alert_watches_the_login_rpc(monitored: RenderedOverlay) -> None:
    (login,) = [r for r in rules(monitored) if r["alert"] == "CakeLoginSlow"]
    assert 'grpc_service="cake.auth.v1.AuthService"' in login["expr"]
    assert 'grpc_method="Login"' in login["expr"]


def test_notifications_alerts_watch_what_the_service_exports(monitored: RenderedOverlay) -> None:
    """Deliveries failing for good, deliveries retried while nothing goes out, messages late,
    and the consumer's dead letters and lag: each on a series notifications' collectors
    (PrometheusNotificationMetrics and its shared consumer's) really expose."""
    registry = CollectorRegistry()
    PrometheusNotificationMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    # Family names (a counter's without `_total`) and the series each one exposes.
    exported = {
        f"{family.name}{suffix}"
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    by_alert = {r["alert"]: r["expr"] for r in rules(monitored)}
    expected = {
        "CakeNotificationsFailing": {"cake_notifications_send_failures_total"},
        "CakeNotificationsNotSending": {
            "cake_notifications_send_retries_total",
            "cake_notifications_messages_sent_total",
        },
        "CakeNotificationsLate": {"cake_notifications_event_to_send_seconds_bucket"},
        "CakeDeadLettersGrowing": {"cake_notifications_dead_letters_total"},
    }
    for alert, series in expected.items():
        named = set(re.findall(r"\bcake_notifications_\w+", by_alert[alert]))
        assert series <= named, (alert, named)
        assert named <= exported, (alert, sorted(named - exported))
    assert 'consumergroup=~"promotions|notifications"' in by_alert["CakeConsumerLag"]
