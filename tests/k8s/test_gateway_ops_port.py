"""The k8s gateway's admin interface is out of the network's reach: a real Envoy runs the pod's
config (local ports and files) and its ``ops`` listener answers the probes and Prometheus but
nothing that changes or reveals the gateway."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cake_devtools import k8s_gateway
from cake_devtools.gateway_config import (
    GatewayContext,
    Upstream,
    default_descriptor_path,
    default_docs_pages_dir,
    default_swagger_ui_dir,
)
from cake_devtools.stack.envoy import run_gateway

RUNTIME_KEY = "cake.gateway.rate_limit_enforced"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class Gateway:
    ops: str
    admin: str


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("k8s-ops-envoy")
    openapi = workdir / "openapi.json"
    openapi.write_text(json.dumps({"openapi": "3.0.3", "info": {"title": "t", "version": "0"}}))
    pod = k8s_gateway.k8s_gateway_context(
        descriptor_path=default_descriptor_path(),
        openapi_path=openapi,
        docs_pages_dir=default_docs_pages_dir(),
        swagger_ui_dir=default_swagger_ui_dir(),
    )
    # The pod's config, moved onto free loopback ports (upstreams: nothing listens there).
    context: GatewayContext = dataclasses.replace(
        pod,
        listen_address="127.0.0.1",
        listen_port=free_port(),
        admin_port=free_port(),
        ops_port=free_port(),
        upstreams=tuple(
            Upstream(u.name, "127.0.0.1", free_port(), u.grpc_path_prefix) for u in pod.upstreams
        ),
    )
    assert context.admin_address == "127.0.0.1"
    # Nothing serves the JWKS here (no auth): the ops port does not need it.
    with run_gateway(context, workdir, wait_for_jwks=False):
        yield Gateway(
            ops=f"http://127.0.0.1:{context.ops_port}",
            admin=f"http://127.0.0.1:{context.admin_port}",
        )


def test_the_probe_and_prometheus_paths_answer_on_the_ops_port(gateway: Gateway) -> None:
    ready = httpx.get(f"{gateway.ops}/ready", timeout=5)
    assert (ready.status_code, ready.text.strip()) == (200, "LIVE")
    metrics = httpx.get(f"{gateway.ops}/stats/prometheus", timeout=5)
    assert metrics.status_code == 200
    assert "envoy_server_live{} 1" in metrics.text.splitlines()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/runtime_modify?{RUNTIME_KEY}=0"),
        ("GET", f"/runtime_modify?{RUNTIME_KEY}=0"),
        ("POST", "/quitquitquit"),
        ("POST", "/drain_listeners"),
        ("POST", "/healthcheck/fail"),
        ("POST", "/logging?level=trace"),
        ("GET", "/config_dump"),
        ("GET", "/clusters"),
        ("GET", "/runtime"),
        ("GET", "/"),
        ("POST", "/ready"),
        ("POST", "/stats/prometheus"),
        ("GET", "/stats/prometheus/../../runtime_modify"),
        ("GET", "//ready/../runtime"),
    ],
)
def test_everything_else_of_the_admin_interface_is_unreachable(
    gateway: Gateway, method: str, path: str
) -> None:
    response = httpx.request(method, f"{gateway.ops}{path}", timeout=5)
    assert response.status_code == 404, (method, path, response.status_code, response.text)


def test_a_runtime_change_through_the_ops_port_does_not_happen(gateway: Gateway) -> None:
    httpx.post(f"{gateway.ops}/runtime_modify?{RUNTIME_KEY}=0", timeout=5)
    runtime = httpx.get(f"{gateway.admin}/runtime", timeout=5).json()
    assert RUNTIME_KEY not in runtime["entries"]
    # The admin interface itself (loopback; `kubectl port-forward` in the cluster) still works.
    assert httpx.post(f"{gateway.admin}/runtime_modify?{RUNTIME_KEY}=100", timeout=5).is_success
    runtime = httpx.get(f"{gateway.admin}/runtime", timeout=5).json()
    assert runtime["entries"][RUNTIME_KEY]["final_value"] == "100"
    # and Envoy still serves (a healthcheck/fail would have turned /ready into 503).
    assert httpx.get(f"{gateway.ops}/ready", timeout=5).status_code == 200


def test_the_admin_interface_listens_on_loopback_only(repo: Path) -> None:
    import yaml

    config = yaml.safe_load((repo / k8s_gateway.OUTPUT_PATH).read_text(encoding="utf-8"))
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    listeners = {
        listener["name"]: listener["address"]["socket_address"]
        for listener in config["static_resources"]["listeners"]
    }
    assert listeners["ops"] == {"address": "0.0.0.0", "port_value": k8s_gateway.OPS_PORT}


def test_the_alert_rules_envoy_series_exist(gateway: Gateway, repo: Path) -> None:
    """The gateway alerts of k8s/components/prometheus-operator name series this Envoy really
    exports through the ops port (its metric and label names, with the listener's prefix)."""
    import re

    import yaml

    rule = yaml.safe_load(
        (repo / "k8s/components/prometheus-operator/alert-rules.yaml").read_text()
    )
    expressions = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    selectors = [
        (name, dict(re.findall(r'(\w+)="([^"]*)"', matchers)))
        for expr in expressions
        for name, matchers in re.findall(r"\b(envoy_\w+)\{([^}]*)\}", expr)
    ]
    assert selectors, "the rules name no Envoy series"
    lines = httpx.get(f"{gateway.ops}/stats/prometheus", timeout=5).text.splitlines()
    for name, labels in selectors:
        found = [
            line
            for line in lines
            if line.startswith(name + "{")
            and all(f'{key}="{value}"' in line.split("}")[0] for key, value in labels.items())
        ]
        assert found, (name, labels)
